"""DenseCLIP Mask R-CNN (denseclip/maskrcnn.py): masks through the data and the detector's transform on a case
whose answer is known, mmdet's RoI level rule, the shared backbone-with-neck, mask COCOeval, official mmdet
checkpoints mapped onto torchvision's heads, and train.py / eval.py end to end on a COCO-format dataset."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import roi_align

import official_keys
from denseclip import build_model
from denseclip.run.tasks import task_for
from denseclip.run.visualize import class_colours, detection_picture
from denseclip.checkpoint import CheckpointError, load_checkpoint, mmdet_maskrcnn_heads_to_ours
from denseclip.data.coco import CocoDetection
from denseclip.data.procedural import ProceduralDetection
from denseclip.run.coco_eval import CocoEvaluator, STAT_NAMES
from denseclip.data.transforms import sample_rng
from denseclip.detection import features, maskrcnn, retinanet
from denseclip.detection.maskrcnn import MMDetRoIAlign
from denseclip.clip import CLIP_MEAN, CLIP_STD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_coco import make_coco_dataset  # noqa: E402
from test_train import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import train  # noqa: E402

NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("maskrcnn_denseclip_tiny", NAMES, min_size=64, max_size=107)


def rle_counts(mask: np.ndarray) -> list:
    """COCO's uncompressed RLE of a binary mask: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)  # start of each run (and the end)
    return np.diff(np.concatenate([[0], edges[1:]])).tolist() if flat[0] == 0 else [0, *np.diff(edges).tolist()]


# ------------------------------------------------------------------------------------------------- masks
def test_masks_follow_flip_resize_and_pad(tmp_path, tiny):
    """Two images (landscape 48x32, portrait 32x48), each with a red rectangle given as a polygon and a green
    L-shape given as compressed RLE. Through the dataset's flip and the detector's train transform (x2 resize,
    pad to 96x96) every mask must still be exactly where its colour is, and every box its mask's extent."""
    specs = {1: (48, 32), 2: (32, 48)}
    images, anns = [], []
    for image_id, (w, h) in specs.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[3:8, 2:12, 0] = 255  # the polygon's pixels (x 2..11, y 3..7)
        ell = np.zeros((h, w), np.uint8)
        ell[10:20, 15:18] = ell[17:20, 15:25] = 1
        img[..., 1] = 255 * ell
        Image.fromarray(img).save(tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        rle = mask_utils.encode(np.asfortranarray(ell))
        anns += [{"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 50,
                  "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
                 {"id": len(anns) + 2, "image_id": image_id, "category_id": 2, "bbox": [15, 10, 10, 10], "area": 51,
                  "iscrowd": 0, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "rect"}, {"id": 2, "name": "ell"}]}))
    ds = CocoDetection(tmp_path, tmp_path / "a.json", train=True, seed=0, masks=True)
    epoch = next(e for e in range(20) if sample_rng(0, e, 0).random() < 0.5 <= sample_rng(0, e, 1).random())
    ds.set_epoch(epoch)  # image 0 flipped, image 1 not
    batch = [ds[0], ds[1]]
    assert batch[0][1]["boxes"][0].tolist() == [48 - 12, 3, 48 - 2, 8] and batch[1][1]["boxes"][0].tolist() == \
        [2, 3, 12, 8]
    tiny.train()
    image_list, targets = tiny.transform([b[0] for b in batch], [dict(b[1]) for b in batch])
    assert image_list.tensors.shape == (2, 3, 96, 96)  # padded to a multiple of 32
    assert image_list.image_sizes == [(64, 96), (96, 64)]  # shorter side 32 -> min_size 64
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    for i, ((h, w), t) in enumerate(zip(image_list.image_sizes, targets)):
        pixels = image_list.tensors[i] * std + mean  # (3, 96, 96) back in [0, 1]
        assert t["masks"].shape == (2, h, w) and t["masks"].dtype == torch.uint8
        for k in range(2):  # mask k is where channel k is bright, nowhere else
            assert torch.equal(t["masks"][k].bool(), pixels[k, :h, :w] > 0.5)
            ys, xs = torch.nonzero(t["masks"][k], as_tuple=True)
            assert t["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert (image_list.tensors[i, :, h:, :] == 0).all() and (image_list.tensors[i, :, :, w:] == 0).all()


def test_procedural_training_data_has_masks_for_maskrcnn_only():
    args = train.parse_args(["--model", "maskrcnn_tiny"])
    cfg = build_model("maskrcnn_tiny", NAMES).cfg
    task = task_for("maskrcnn_tiny")
    assert task.dataset(args, "train", cfg).masks and not task.dataset(args, "val", cfg).masks
    args = train.parse_args(["--model", "retinanet_tiny"])
    assert not task_for("retinanet_tiny").dataset(args, "train", build_model("retinanet_tiny", NAMES).cfg).masks


# ------------------------------------------------------------------------------------------------- model
def test_roi_levels_and_features_are_mmdets():
    """mmdet's map_roi_levels written out: floor(log2(sqrt(w h) / 56 + 1e-6)) clamped to 0..3, then RoIAlign with
    aligned=True and spatial scale 1 / stride of that level."""
    pool = MMDetRoIAlign(["0", "1", "2", "3"], [4, 8, 16, 32], 7, 0, 56)
    sides = torch.tensor([10.0, 111.9, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    official = torch.floor(torch.log2(sides / 56 + 1e-6)).clamp(0, 3).long()
    assert pool.levels(boxes).tolist() == official.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(2, 4, 128 // 2 ** i, 96 // 2 ** i, generator=g) for i in range(4)}
    per_image = [torch.tensor([[3.0, 5.0, 40.5, 60.0], [0.0, 0.0, 300.0, 500.0]]), torch.tensor([[10, 10, 130, 200.]])]
    out = pool(feats, per_image, [(512, 384)] * 2)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])
    for r, roi in enumerate(rois):
        lvl = int(torch.floor(torch.log2(((roi[3] - roi[1]) * (roi[4] - roi[2])).sqrt() / 56 + 1e-6)).clamp(0, 3))
        expect = roi_align(feats[str(lvl)], roi[None], (7, 7), 1 / 4 / 2 ** lvl, 0, aligned=True)
        assert torch.allclose(out[r], expect[0], atol=1e-6)


@pytest.mark.parametrize("size", [64, 96])
def test_train_losses_and_eval_outputs(tiny, size):
    ds = ProceduralDetection("train", size=size, length=2, masks=True)
    images, targets = zip(*[ds[0], ds[1]])
    targets = [{**t, "labels": t["labels"] % 3} for t in targets]  # 7 shapes -> the model's 3 classes
    tiny.train()
    torch.manual_seed(0)
    losses = tiny(list(images), list(targets))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "loss_aux"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert tiny.contexts.grad is not None and tiny.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    tiny.zero_grad()
    tiny.eval()
    with torch.no_grad():
        dets = tiny([images[0], images[1][:, :, : size - 8]])
    for det, (h, w) in zip(dets, [(size, size), (size, size - 8)]):
        n = len(det["boxes"])
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.uint8
        assert det["labels"].min() >= 0 and det["labels"].max() < 3 and det["scores"].shape == (n,)


def test_shares_the_retinanet_backbone_with_neck():
    """One DenseCLIP path: the same function, the same parameter names and shapes below the heads; with a copied state
    the same FPN levels; the neck is mmdet's Mask R-CNN FPN (P2..P6, P6 = P5 subsampled)."""
    torch.manual_seed(0)
    mask = build_model("maskrcnn_denseclip_tiny", NAMES, min_size=64, max_size=107)
    retina = build_model("retinanet_denseclip_tiny", NAMES, min_size=64, max_size=107, fpn_start_level=0,
                         fpn_add_extra_convs="", anchor_strides=(4, 8, 16, 32, 64))
    assert maskrcnn.extract_feat is retinanet.extract_feat is features.extract_feat
    assert maskrcnn.add_text_and_neck is retinanet.add_text_and_neck is features.add_text_and_neck
    shared = {k: v.shape for k, v in retina.state_dict().items() if not k.startswith("head.")}
    assert shared == {k: v.shape for k, v in mask.state_dict().items() if not k.startswith(("rpn.", "roi_heads."))}
    mask.load_state_dict({**mask.state_dict(), **{k: retina.state_dict()[k] for k in shared}})
    mask.eval(), retina.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (a, sa), (b, sb) = features.extract_feat(mask, x), features.extract_feat(retina, x)
    assert [f.shape[-2:] for f in a] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and torch.equal(sa, sb)
    assert torch.equal(a[4], a[3][..., ::2, ::2])  # mmdet's max_pool2d(P5, 1, stride=2)
    names = dict(mask.named_parameters())
    assert [k for k, p in names.items() if "text_encoder" in k and not p.requires_grad] == [
        "text_encoder.token_embedding.weight"]  # the tiny recipes' text encoder learns, but its BPE table
    assert all("backbone" in k for k in names if k.startswith("backbone."))


def test_configs():
    for name in ("maskrcnn_denseclip_r50", "maskrcnn_clip_r50", "maskrcnn_denseclip_r101", "maskrcnn_clip_r101"):
        cfg = build_model.__globals__["CONFIGS"][name]()
        assert (cfg.detector, cfg.fpn_start_level, cfg.fpn_add_extra_convs, cfg.fpn_num_outs) == ("maskrcnn", 0, "",
                                                                                                   5)
        assert cfg.anchor_strides == (4, 8, 16, 32, 64) and cfg.octave_base_scale == 8.0 and cfg.input_resolution \
            == 1344 and (cfg.min_size, cfg.max_size) == (800, 1333) and cfg.use_text == ("denseclip" in name)
        assert (cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.rpn_post_nms_top_n_train) == (0.7, 0.3, 1000)


# ------------------------------------------------------------------------------------------- evaluation
def test_mask_ap_equals_cocoeval_on_the_written_results(tmp_path):
    """Ground-truth masks, some eroded, as detections: the evaluator's segm AP equals COCOeval's on its results
    written to JSON; perfect masks score 1."""
    ds = ProceduralDetection("val", size=64, length=8)
    perfect, damaged = CocoEvaluator(ds), CocoEvaluator(ds)
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        _, boxes, labels, masks = ds.raw(i)
        masks = torch.from_numpy(masks.astype(np.uint8))
        det = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": labels, "masks": masks}
        perfect.update(i, i, det)
        cut = masks.clone()
        cut[:, :, : 8 * (i % 3)] = 0  # lose a strip on the left of some
        damaged.update(i, i, {**det, "masks": cut})
    perfect.reduce_from_all_processes()
    damaged.reduce_from_all_processes()
    assert perfect.compute()["segm"]["AP"] == 1.0 and perfect.compute()["AP"] == 1.0
    res = damaged.compute()
    assert res["AP"] == 1.0 and 0.3 < res["segm"]["AP"] < 1.0
    path = tmp_path / "segm.json"
    path.write_text(json.dumps(damaged.segm_results))
    assert isinstance(damaged.segm_results[0]["segmentation"]["counts"], str)
    direct = COCOeval(ds.coco, ds.coco.loadRes(str(path)), "segm")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert list(direct.stats) == [res["segm"][k] for k in STAT_NAMES]
    assert "segm:" in damaged.format_table(ds.class_names)


def test_show_dir_picture_draws_boxes_and_mask_outlines():
    image = torch.zeros(3, 40, 50)
    mask = torch.zeros(1, 40, 50, dtype=torch.uint8)
    mask[0, 10:20, 5:25] = 1
    det = {"boxes": torch.tensor([[30.0, 5.0, 45.0, 35.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1]), "masks": mask}
    picture, info = detection_picture(image, det, NAMES)
    x0, y0, f = info["view"]  # the 50 x 40 image is enlarged 8 times
    pic = np.asarray(picture)[y0:y0 + 40 * f, x0:x0 + 50 * f]
    colour = class_colours(len(NAMES))[1]
    assert f == 8 and (pic[20 * f, 30 * f] == colour).all() and (pic[35 * f - 1, 38 * f] == colour).all()  # box
    assert (pic[10 * f, 5 * f:25 * f] == colour).all() and (pic[15 * f, 5 * f] == colour).all()  # mask outline
    inside = pic[15 * f, 10 * f:20 * f].astype(int)  # the mask's inside: the colour lightly over the black image
    assert np.abs(inside - np.round(0.35 * np.array(colour))).max() <= 1
    assert info["legend"][0]["name"] == NAMES[1] and info["legend"][0]["boxes"] == 1
    low, info = detection_picture(image, {**det, "scores": torch.tensor([0.1])}, NAMES)
    assert not np.asarray(low)[y0:y0 + 40 * f, x0:x0 + 50 * f].any()  # under the score threshold: nothing drawn
    assert info["note"] == "no detection with score >= 0.30"


# ------------------------------------------------------------------------------------ official checkpoints
def official_maskrcnn_heads(K, channels=256, fc=1024, mask_channels=256, num_anchors=3):
    """mmdet 2.17 RPNHead, Shared2FCBBoxHead (roi_feat_size 7) and FCNMaskHead (4 convs, deconv upsample) keys."""
    A = num_anchors
    keys = {"rpn_head.rpn_conv.weight": (channels, channels, 3, 3), "rpn_head.rpn_conv.bias": (channels,),
            "rpn_head.rpn_cls.weight": (A, channels, 1, 1), "rpn_head.rpn_cls.bias": (A,),
            "rpn_head.rpn_reg.weight": (4 * A, channels, 1, 1), "rpn_head.rpn_reg.bias": (4 * A,),
            "roi_head.bbox_head.shared_fcs.0.weight": (fc, channels * 49),
            "roi_head.bbox_head.shared_fcs.0.bias": (fc,),
            "roi_head.bbox_head.shared_fcs.1.weight": (fc, fc), "roi_head.bbox_head.shared_fcs.1.bias": (fc,),
            "roi_head.bbox_head.fc_cls.weight": (K + 1, fc), "roi_head.bbox_head.fc_cls.bias": (K + 1,),
            "roi_head.bbox_head.fc_reg.weight": (4 * K, fc), "roi_head.bbox_head.fc_reg.bias": (4 * K,),
            "roi_head.mask_head.upsample.weight": (mask_channels, mask_channels, 2, 2),
            "roi_head.mask_head.upsample.bias": (mask_channels,),
            "roi_head.mask_head.conv_logits.weight": (K, mask_channels, 1, 1),
            "roi_head.mask_head.conv_logits.bias": (K,)}
    for i in range(4):
        cin = channels if i == 0 else mask_channels
        keys[f"roi_head.mask_head.convs.{i}.conv.weight"] = (mask_channels, cin, 3, 3)
        keys[f"roi_head.mask_head.convs.{i}.conv.bias"] = (mask_channels,)
    return keys


def official_maskrcnn(name, K):
    """The whole official DenseCLIP_MaskRCNN (or CLIP baseline) state dict layout of a named config."""
    retina = getattr(official_keys, name.replace("maskrcnn", "retinanet"))(K)
    keys = {k: v for k, v in retina.items() if not k.startswith(("bbox_head.", "neck."))}
    neck_in = [256, 512, 1024, 2048 + (K if "denseclip" in name else 0)]
    if name.endswith("tiny"):
        neck_in = [64, 128, 256, 512 + (K if "denseclip" in name else 0)]
        return {**keys, **official_keys.mmdet_fpn(neck_in, 32, 0, 4, False), **official_maskrcnn_heads(K, 32, 128, 32)}
    # mmdet's Mask R-CNN FPN: 4 laterals and 4 output convs; P6 is a parameter-free max pool
    return {**keys, **official_keys.mmdet_fpn(neck_in, 256, 0, 4, False), **official_maskrcnn_heads(K)}


def test_official_maskrcnn_checkpoint_loads_with_every_key_accounted_for(tmp_path):
    K = 3
    spec = official_maskrcnn("maskrcnn_denseclip_tiny", K)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in spec.items()}
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": NAMES}}, path)
    model = build_model("maskrcnn_denseclip_tiny", NAMES, min_size=64, max_size=107).eval()
    report = load_checkpoint(model, str(path))
    assert report.kind == "model" and len(report.loaded) == len(model.state_dict())
    assert [n.split(":")[0] for n in report.notes] == ["roi_heads.box_predictor.bbox_pred",
                                                       "roi_heads.mask_predictor.mask_fcn_logits"]
    assert all("background" in n for n in report.notes)
    own = model.state_dict()
    assert torch.equal(own["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])
    assert torch.equal(own["neck.fpn_convs.3.conv.weight"], sd["neck.fpn_convs.3.conv.weight"])
    # the official box head's outputs: fc_cls softmax over K + 1 with background LAST, fc_reg 4 per class
    x = torch.randn(5, 32 * 49, generator=g)
    h = torch.relu(torch.relu(x @ sd["roi_head.bbox_head.shared_fcs.0.weight"].T + sd[
        "roi_head.bbox_head.shared_fcs.0.bias"]) @ sd["roi_head.bbox_head.shared_fcs.1.weight"].T + sd[
        "roi_head.bbox_head.shared_fcs.1.bias"])
    cls = (h @ sd["roi_head.bbox_head.fc_cls.weight"].T + sd["roi_head.bbox_head.fc_cls.bias"]).softmax(-1)
    reg = h @ sd["roi_head.bbox_head.fc_reg.weight"].T + sd["roi_head.bbox_head.fc_reg.bias"]
    with torch.no_grad():
        ours_cls, ours_reg = model.roi_heads.box_predictor(model.roi_heads.box_head(x.view(5, 32, 7, 7)))
    ours_cls = ours_cls.softmax(-1)
    assert torch.allclose(ours_cls[:, 1:], cls[:, :K], atol=1e-5) and torch.allclose(ours_cls[:, 0], cls[:, K])
    assert torch.allclose(ours_reg[:, 4:], reg, atol=1e-4)
    # the official mask head: class k's logits are conv_logits channel k (torchvision's channel k + 1)
    m = torch.randn(2, 32, 14, 14, generator=g)
    with torch.no_grad():
        ours = model.roi_heads.mask_predictor(model.roi_heads.mask_head(m))
    y = m
    for i in range(4):
        y = torch.relu(torch.nn.functional.conv2d(y, sd[f"roi_head.mask_head.convs.{i}.conv.weight"],
                                                  sd[f"roi_head.mask_head.convs.{i}.conv.bias"], padding=1))
    y = torch.relu(torch.nn.functional.conv_transpose2d(y, sd["roi_head.mask_head.upsample.weight"],
                                                        sd["roi_head.mask_head.upsample.bias"], stride=2))
    logits = torch.nn.functional.conv2d(y, sd["roi_head.mask_head.conv_logits.weight"],
                                        sd["roi_head.mask_head.conv_logits.bias"])
    # the random-weight logits reach ~1e6: compare to their scale (fp32 sums in another order differ by ~1e-7 of it,
    # also on elements near 0)
    assert ours.shape == (2, K + 1, 28, 28)
    assert (ours[:, 1:] - logits).abs().max() <= 1e-5 * logits.abs().max()


def test_official_full_size_layout_maps_onto_our_model():
    """Key names and shapes only (no forward): the full-size official layout, mapped, is exactly our keys."""
    K = 80
    spec = official_maskrcnn("maskrcnn_denseclip_r50", K)
    model = build_model("maskrcnn_denseclip_r50")
    mapped = mmdet_maskrcnn_heads_to_ours({k: torch.zeros(()).expand(v) for k, v in spec.items()})[0]
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in
                                                               model.state_dict().items()}


def test_mapping_rejects_unknown_head_keys():
    with pytest.raises(CheckpointError, match="roi_head.bbox_head.fc_extra"):
        mmdet_maskrcnn_heads_to_ours({"roi_head.bbox_head.fc_extra.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- end to end
def add_segmentations(root: Path, size=64):
    """make_coco_dataset's jsons with instance masks: even objects as compressed RLE, odd ones as the polygon of
    their box, crowd ones as uncompressed RLE (as COCO stores crowds); the same sources in the same order."""
    for split, n in (("train", 6), ("val", 3)):
        path = root / f"{split}.json"
        gt = json.loads(path.read_text())
        source = ProceduralDetection("train", size=size, length=n + 2, seed={"train": 1, "val": 2}[split])
        anns = iter(gt["annotations"])
        for i in range(n):
            if i == 1:
                continue
            _, boxes, _, masks = source.raw(i)
            for j, (box, m) in enumerate(zip(boxes.tolist(), masks)):
                ann = next(anns)
                if ann["iscrowd"]:
                    ann["segmentation"] = {"size": [size, size], "counts": rle_counts(m)}
                elif j % 2 == 0:
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                else:
                    x1, y1, x2, y2 = box
                    ann["segmentation"] = [[x1, y1, x2, y1, x2, y2, x1, y2]]
                ann["area"] = float(mask_utils.area(ann_rle(ann, size)))
        path.write_text(json.dumps(gt))


def ann_rle(ann, size):
    """pycocotools' annToRLE for a square image of `size`."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, size, size))
    return mask_utils.frPyObjects(seg, size, size) if isinstance(seg["counts"], list) else seg


def test_train_eval_out_equals_cocoeval_for_boxes_and_masks(tmp_path, capsys):
    data = make_coco_dataset(tmp_path / "data")
    add_segmentations(tmp_path / "data")
    gt = COCO(str(tmp_path / "data" / "val.json"))
    crowd = next(a for a in gt.anns.values() if a["iscrowd"])
    assert isinstance(crowd["segmentation"]["counts"], list) and gt.annToMask(crowd).sum() == crowd["area"]
    tiny = ["--batch-size", "2", "--log-interval", "1", "--workers", "0", "--set", "min_size=64", "--set",
            "max_size=107", "--set", "score_thresh=0.001", "--lr", "1e-3", "--warmup-iters", "1"]
    out = tmp_path / "run"
    res = train.main(["--model", "maskrcnn_tiny", *tiny, *data, "--iters", "1", "--eval-interval", "0",
                      "--out-dir", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == [f"bbox AP {100 * res['AP']:.2f}", f"segm AP {100 * res['segm']['AP']:.2f}"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(log[0])
    dets = tmp_path / "dets.json"
    ev = evaluation.main([str(out / "iter_000001.pt"), "--workers", "0", "--out", str(dets), "--show-dir",
                          str(tmp_path / "show")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == [f"bbox AP {100 * ev['AP']:.2f}", f"segm AP {100 * ev['segm']['AP']:.2f}"]
    assert ev["AP"] == res["AP"] and ev["segm"]["AP"] == res["segm"]["AP"]
    assert sorted(p.name for p in (tmp_path / "show").iterdir()) == ["val_0.png", "val_1.png", "val_2.png"]
    segm = json.loads((tmp_path / "dets.segm.json").read_text())
    assert len(segm) == len(json.loads(dets.read_text())) > 0
    assert {r["category_id"] for r in segm} <= {2, 5, 8, 11, 14, 17, 20} and isinstance(segm[0]["segmentation"]
                                                                                         ["counts"], str)
    for iou_type, path, expect in (("bbox", dets, ev), ("segm", tmp_path / "dets.segm.json", ev["segm"])):
        e = COCOeval(gt, gt.loadRes(str(path)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
        assert list(e.stats) == [expect[k] for k in STAT_NAMES]


def test_complexity_counts_the_two_stage_forward_dummy():
    """bench/complexity.py on the tiny Mask R-CNN: the RoI heads' count is exactly mmdet's forward_dummy workload
    (box head on 1000 proposals, mask head on 100), the deconv under fvcore's 2021 rule as the official rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_complexity", ROOT / "bench" / "complexity.py")
    complexity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(complexity)
    row = complexity.measure("maskrcnn_denseclip_tiny", (96, 128))
    C, fc, K1, S = 32, 128, 81, 28  # FPN width, fc width, 80 COCO classes + background, mask side
    box = 1000 * (C * 49 * fc + fc * fc + fc * K1 * 5)  # two fcs, class scores and 4 deltas per class
    mask = 100 * (4 * 14 * 14 * C * C * 9 + S * S * C * C * 4 + S * S * C * K1)  # convs, deconv (2021), logits
    assert row["modules"]["roi_heads"] * 1e9 == pytest.approx(box + mask, rel=1e-9)
    assert row["modules"]["rpn"] > 0 and row["modules"]["context_decoder"] > 0
