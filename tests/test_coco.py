"""Detection data and COCO evaluation (denseclip/coco.py): COCO-format parsing as mmdet's CocoDataset (category
id mapping, crowd / zero-area / out-of-image boxes, images without boxes), flips that move boxes with the
pixels, the procedural shapes' boxes and masks, and COCOeval on gathered detections."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from denseclip.run import optim
from denseclip.run.batches import collate_detection, to_device
from denseclip.data.coco import CocoDetection, flip_boxes
from denseclip.data.preflight_coco import rle_runs
from denseclip.errors import DataError
from denseclip.data.procedural import ProceduralDetection
from denseclip.run.coco_eval import CocoEvaluator
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES, render_shapes
from denseclip.data.transforms import sample_rng


def cat_id(label: int) -> int:
    """Category ids as COCO's: not contiguous, not starting at 0 or 1."""
    return 3 * label + 2


def column_runs(mask: np.ndarray) -> list:
    """COCO's uncompressed RLE counts of a binary mask: run lengths over its column-major pixels, starting with
    background (a leading 0 when the first pixel is foreground)."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    return ([0] if flat[0] else []) + np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()


def box_segmentation(box, crowd: bool, size: int):
    """A box's region as COCO stores it: a polygon (its four corners), or for a crowd uncompressed RLE."""
    x1, y1, x2, y2 = box
    if not crowd:
        return [[x1, y1, x2, y1, x2, y2, x1, y2]]
    mask = np.zeros((size, size), np.uint8)
    mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
    return {"size": [size, size], "counts": column_runs(mask)}


def make_coco_dataset(root: Path, n_train=6, n_val=3, size=64):
    """Procedural shapes written as PNG images + COCO-format jsons (train / val) in COCO's own form (polygons, crowd
    RLE), with the awkward cases: a crowd box, an image without annotations, an image whose only annotation is a
    crowd box. Returns the train.py / eval.py data options."""
    (root / "images").mkdir(parents=True)
    cats = [{"id": cat_id(k), "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES[1:])]
    cats = cats[::-1]  # json order is not id order
    for split, n in (("train", n_train), ("val", n_val)):
        source = ProceduralDetection("train", size=size, length=n + 2, seed={"train": 1, "val": 2}[split])
        images, anns = [], []
        for i in range(n):
            image, boxes, labels, _ = source.raw(i)
            image_id = 1000 + 7 * i + (split == "val")
            name = f"{split}_{i}.png"
            Image.fromarray(image).save(root / "images" / name)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            if i == 1:
                continue  # an image without annotations
            for j, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
                x1, y1, x2, y2 = box
                crowd = i == 2 or j == 1  # image 2 has crowd boxes only
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id(label),
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd),
                             "segmentation": box_segmentation(box, crowd, size)})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ["--dataset", "coco", "--train-ann", str(root / "train.json"), "--train-images", str(root / "images"),
            "--val-ann", str(root / "val.json"), "--val-images", str(root / "images")]


def coco2017_layout(src: Path, root: Path) -> Path:
    """make_coco_dataset(src)'s files arranged as COCO 2017 under root: annotations/instances_{split}2017.json and
    {split}2017/ image folders (what --data-root expects). Returns root."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(src / "images", root / f"{split}2017")
        shutil.copy(src / f"{split}.json", root / f"annotations/instances_{split}2017.json")
    return root


def write_json(path: Path, anns, width=40, height=30, cats=((7, "dog"), (3, "cat"))):
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path.parent / "a.png")
    images = [{"id": 5, "file_name": "a.png", "width": width, "height": height}]
    anns = [{"id": i + 1, "image_id": 5, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a}
            for i, a in enumerate(anns)]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": n} for c, n in cats]}))
    return path


# --------------------------------------------------------------------------------------------- COCO files
def test_category_ids_map_to_labels_and_back(tmp_path):
    make_coco_dataset(tmp_path)
    ds = CocoDetection(tmp_path / "images", tmp_path / "val.json")
    assert ds.cat_ids == sorted(cat_id(k) for k in range(7))  # sorted by id, whatever the json order
    assert ds.class_names == list(SHAPE_CLASSES[1:])  # names from the json, in that order
    assert [ds.label_of[c] for c in ds.cat_ids] == list(range(7))
    gt = ds.coco
    for index in range(len(ds)):
        _, target = ds[index]
        image_id = int(target["image_id"])
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        assert sorted(ds.cat_ids[k] for k in target["labels"].tolist()) == sorted(a["category_id"] for a in anns)
    # and back: an evaluator writes the json's own ids
    ev = CocoEvaluator(ds)
    ev.update(0, ds.ids[0], {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]] * 7), "scores": torch.ones(7),
                             "labels": torch.arange(7)})
    assert [r["category_id"] for r in ev.results] == ds.cat_ids
    assert ev.results[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]  # xywh
    assert ev.results[0]["image_id"] == ds.ids[0]


def test_crowd_zero_area_and_out_of_image_boxes(tmp_path):
    ann = write_json(tmp_path / "a.json", [
        {"bbox": [2, 3, 10, 5], "category_id": 7},  # kept as is, label 1 (dog: id 7 > cat: id 3)
        {"bbox": [5, 5, 8, 8], "category_id": 3, "iscrowd": 1},  # crowd: not a training target
        {"bbox": [30, -4, 20, 10], "category_id": 3},  # partly outside: clipped to [30, 0, 40, 6]
        {"bbox": [45, 5, 5, 5], "category_id": 3},  # entirely outside: dropped
        {"bbox": [5, 5, 0, 8], "category_id": 3},  # zero width: dropped
        {"bbox": [5, 5, 0.5, 8], "category_id": 3},  # under a pixel wide: dropped (as mmdet)
        {"bbox": [5, 5, 4, 4], "category_id": 3, "area": 0},  # zero area: dropped
    ])
    ds = CocoDetection(tmp_path, ann)
    assert ds.class_names == ["cat", "dog"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 0, 40, 6]]
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"].item() == 5


def test_images_without_boxes(tmp_path):
    make_coco_dataset(tmp_path)
    val = CocoDetection(tmp_path / "images", tmp_path / "val.json")
    train = CocoDetection(tmp_path / "images", tmp_path / "train.json", train=True)
    assert len(val) == 3  # validation keeps the image without annotations
    assert len(val[1][1]["boxes"]) == 0 and val[1][1]["boxes"].shape == (0, 4)
    gt_train = json.loads((tmp_path / "train.json").read_text())
    assert len(gt_train["images"]) == 6 and len(train) == 4  # no annotations / crowd only: skipped in training
    assert 1000 + 7 * 1 not in train.ids and 1000 + 7 * 2 not in train.ids
    assert all(len(train[i][1]["boxes"]) for i in range(len(train)))


def test_errors_name_the_file(tmp_path):
    ann = write_json(tmp_path / "a.json", [{"bbox": [2, 3, 10, 5], "category_id": 7}], width=41)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="a.png"):  # the json says 41 wide, the file is 40
        CocoDetection(tmp_path, ann)[0]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(tmp_path, tmp_path / "missing.json")


@pytest.mark.parametrize("file_name,why", [("/etc/hosts", "is absolute"), ("../a.png", "climbs out"),
                                           ("x/../../a.png", "climbs out"), ("C:\\data\\a.png", "is absolute"),
                                           ("..\\a.png", "climbs out"), ("x/..", "names the image folder")])
def test_file_names_that_leave_the_image_folder_are_refused_by_the_loader(tmp_path, file_name, why):
    """Without any pre-flight (--check-data off): the loader itself never reads outside its image folder."""
    ann = write_json(tmp_path / "a.json", [{"bbox": [2, 3, 10, 5], "category_id": 7}])
    d = json.loads(ann.read_text())
    d["images"][0]["file_name"] = file_name
    ann.write_text(json.dumps(d))
    with pytest.raises(DataError) as info:
        CocoDetection(tmp_path, ann)
    assert all(w in str(info.value) for w in (str(ann), "image id 5", repr(file_name), why)), str(info.value)


def test_compressed_rle_runs_are_read_as_pycocotools_writes_them():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (64, 48), (300, 200)):
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        mask[: h // 2] |= rng.random((h // 2, w)) < 0.9  # long runs too: several characters per number
        rle = mask_utils.encode(np.asfortranarray(mask))
        assert rle_runs(rle["counts"].decode()) == column_runs(mask)
    assert rle_runs("!!") is None and rle_runs("P") is None  # outside the alphabet; cut mid-number


def test_train_flip_moves_boxes_and_masks_with_the_pixels(tmp_path):
    """A bright box on a dark image: after the flip the box still covers exactly the bright pixels; which samples
    flip is sample_rng(seed, epoch, index)'s first draw (so a resumed run flips the same ones)."""
    img = np.zeros((30, 40, 3), np.uint8)
    img[3:8, 2:12] = 255
    ann = write_json(tmp_path / "a.json", [{"bbox": [2, 3, 10, 5], "category_id": 7,
                                            "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]}])
    Image.fromarray(img).save(tmp_path / "a.png")
    ds = CocoDetection(tmp_path, ann, train=True, seed=0, masks=True)
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        image, target = ds[0]
        flipped = sample_rng(0, epoch, 0).random() < 0.5
        flips.append(flipped)
        x1, y1, x2, y2 = target["boxes"][0].int().tolist()
        assert (x1, y1, x2, y2) == ((40 - 12, 3, 40 - 2, 8) if flipped else (2, 3, 12, 8))
        bright = image[0] > 0.5
        assert bright[y1:y2, x1:x2].all() and bright.sum() == (x2 - x1) * (y2 - y1)
        assert torch.equal(target["masks"][0].bool(), bright)
    assert any(flips) and not all(flips)
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 40.0, 30.0]])
    assert torch.equal(flip_boxes(flip_boxes(boxes, 40), 40), boxes)


# -------------------------------------------------------------------------------------------- procedural
def test_render_shapes_instances_do_not_change_the_images():
    a = render_shapes(np.random.default_rng(5), 64)
    image, label, inst, classes = render_shapes(np.random.default_rng(5), 64, instances=True)
    assert np.array_equal(a[0], image) and np.array_equal(a[1], label)
    for i, cls in enumerate(classes, 1):  # where an instance is visible, the label is its class
        assert (label[inst == i] == cls).all()
    assert ((inst > 0) == (label > 0)).all()


def test_procedural_boxes_enclose_the_visible_masks():
    ds = ProceduralDetection("val", size=96, masks=True)
    seg = ProceduralShapes("val", size=96)
    n_objects = 0
    for index in range(30):
        image, target = ds[index]
        assert image.shape == (3, 96, 96) and 0 <= image.min() and image.max() <= 1
        raw_image, label = seg.raw(index)  # the segmentation val images, with boxes
        assert torch.equal(image, torch.from_numpy(raw_image).permute(2, 0, 1).float() / 255)
        masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
        assert masks.shape[0] == boxes.shape[0] == labels.shape[0] and masks.dtype == torch.uint8
        for m, box, k in zip(masks.bool(), boxes.int().tolist(), labels.tolist()):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight, pixel edges
            assert m.sum() >= ProceduralDetection.MIN_PIXELS and (torch.from_numpy(label)[m] == k + 1).all()
        n_objects += len(labels)
    assert n_objects > 60  # several objects per image
    gt = ds.coco
    assert len(gt.imgs) == 200 and sorted(gt.cats) == ds.cat_ids == list(range(1, 8))
    assert min(gt.anns) == 1  # COCOeval reads annotation id 0 as "unmatched"
    ann = gt.imgToAnns[3][0]
    assert ann["bbox"][2:] == (lambda b: [b[2] - b[0], b[3] - b[1]])(ds[3][1]["boxes"][0].tolist())


def test_procedural_train_is_resumable():
    a, b = ProceduralDetection("train", size=64, seed=1), ProceduralDetection("train", size=64, seed=1)
    b.set_epoch(1)
    assert not torch.equal(a[3][0], b[3][0])
    a.set_epoch(1)
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(a[3][1]["boxes"], b[3][1]["boxes"])


# ------------------------------------------------------------------------------------------- evaluation
def detections_from(ds, indices, jitter=0.0, seed=0):
    """Ground truth boxes, moved by up to `jitter` pixels, with random scores, plus one false positive each."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in indices:
        boxes, labels = ds[i][1]["boxes"], ds[i][1]["labels"]
        boxes = torch.cat([boxes + jitter * torch.rand(boxes.shape, generator=g), torch.tensor([[0, 0, 20, 20.]])])
        out[i] = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=g),
                  "labels": torch.cat([labels, torch.tensor([0])])}
    return out


def test_perfect_and_empty_detections():
    ds = ProceduralDetection("val", size=64, length=12)
    ev = CocoEvaluator(ds)
    for i in range(len(ds)):
        t = ds[i][1]
        ev.update(i, i, {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]})
    ev.reduce_from_all_processes()
    res = ev.compute()
    assert res["AP"] == 1.0 and res["AP50"] == 1.0
    assert all(ap == 1.0 or np.isnan(ap) for ap in res["class_AP"])
    table = ev.format_table(ds.class_names)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in table
    assert "circle" in table
    empty = CocoEvaluator(ds)
    for i in range(len(ds)):
        empty.update(i, i, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()})
    assert empty.compute()["AP"] == 0.0


def test_evaluator_equals_cocoeval_on_its_results_in_any_order(tmp_path):
    """The AP equals COCOeval run directly on the written results; images updated in another order (as ranks'
    shards arrive) give the same results list, hence the same AP even with tied scores."""
    ds = ProceduralDetection("val", size=64, length=10)
    dets = detections_from(ds, range(10), jitter=3.0)
    for d in dets.values():
        d["scores"] = (d["scores"] * 4).round() / 4  # ties: COCOeval's order among them is the list order
    a, b = CocoEvaluator(ds), CocoEvaluator(ds)
    for i in range(10):
        a.update(i, i, dets[i])
    for i in [3, 5, 7, 9, 1, 0, 2, 4, 6, 8]:  # two shards, concatenated
        b.update(i, i, dets[i])
    a.reduce_from_all_processes()
    b.reduce_from_all_processes()
    assert a.results == b.results
    res = a.compute()
    assert 0.2 < res["AP"] < 1.0 and b.compute()["AP"] == res["AP"]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(a.results))
    gt = ds.coco
    direct = COCOeval(gt, gt.loadRes(str(path)), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert direct.stats[0] == res["AP"] and list(direct.stats) == [res[k] for k in
                                                                     ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                                                      "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")]
    # only the evaluated images count: a subset's AP is scored on that subset's ground truth
    sub = CocoEvaluator(ds)
    sub.update(0, 0, dets[0])
    assert sub.coco_eval().params.imgIds == [0]


def test_coco_ground_truth_loads_like_a_json(tmp_path):
    ds = ProceduralDetection("val", size=64, length=5)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ds.coco.dataset))
    again = COCO(str(path))
    assert again.anns == ds.coco.anns


# --------------------------------------------------------------------------------- batching and schedule
def test_collate_and_to_device():
    ds = ProceduralDetection("val", size=32, length=2)
    images, targets = collate_detection([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"].item() == 1
    moved = to_device((images, targets), torch.device("cpu"))
    assert torch.equal(moved[0][0], images[0]) and torch.equal(moved[1][0]["boxes"], targets[0]["boxes"])
    seg = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(to_device(seg, torch.device("cpu")), seg))


def test_step_schedule_is_mmcv_step_with_linear_warmup():
    def lr(it):
        return optim.step_lr_at(it, 1e-4, steps=[800, 1100], warmup_iters=500)

    assert lr(0) == pytest.approx(1e-7)  # warmup from base x 0.001
    assert lr(250) == pytest.approx(1e-4 * (1 - 0.5 * 0.999))
    assert lr(500) == lr(799) == 1e-4
    assert lr(800) == lr(1099) == pytest.approx(1e-5)
    assert lr(1100) == pytest.approx(1e-6)
    assert optim.step_lr_at(5, 1e-3, steps=[3], warmup_iters=10) == pytest.approx(1e-4 * (1 - 0.5 * 0.999))
