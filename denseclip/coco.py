"""Detection data and evaluation: COCO (or any COCO-format dataset) through pycocotools, the built-in procedural
shapes with boxes and instance masks, and COCO's box and mask AP (COCOeval) over the detections of every rank.

Mirrors mmdet 2.17's `CocoDataset` (annotation parsing, image filtering, class-wise AP) and `RandomFlip`.
Every dataset returns `(image, target)`:
  image   float32 (3, H, W) RGB in [0, 1] at the image's original size (training: flipped with p = 0.5); the
          detector's own transform resizes, normalises and pads, and maps its boxes back to these pixels
  target  {"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,) in 0..K-1, "image_id": int64 scalar,
           "masks": uint8 (N, H, W) only when built with masks=True}
and has `class_names`, `cat_ids` (the COCO category id of class k), `coco` (the ground truth as a pycocotools
COCO object, which evaluation scores against), `set_epoch`, and `task = "detection"` (batched by
engine.collate_detection). Random draws come from data.sample_rng(seed, epoch, index): resumes are exact.

Differences from mmdet, on purpose:
- boxes are clipped to the image (mmdet keeps coordinates outside it, which a flip then maps to the wrong side);
- crowd boxes are left out of training targets (mmdet passes them as `gt_bboxes_ignore`, which RetinaNet's
  assigner, `ignore_iof_thr=-1`, does not use: the same training); COCOeval still uses them, as COCO defines;
- training skips images without a usable box (mmdet keeps an image whose only annotations are crowd ones);
- a json that is not COCO-format or has entries without the fields read fails naming the file and counting them
  (read_coco_json; mmdet raises a KeyError when it first meets one).
"""
import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import SHAPE_CLASSES, ProceduralShapes, read_image, render_shapes, sample_rng
from .errors import DataError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval
# The fields of each entry that pycocotools' index and this loader read (a missing one is a KeyError mid-run);
# COCOeval also reads a ground-truth annotation's iscrowd and area.
FIELDS = {"images": ("id", "file_name", "width", "height"), "annotations": ("id", "image_id", "category_id", "bbox"),
          "categories": ("id", "name")}
EVAL_FIELDS = ("iscrowd", "area")


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO of an in-memory COCO-format dict, without its progress prints on every rank."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def well_formed(key: str, entry, fields) -> bool:
    """An entry of the json's `key` list (images, annotations, categories) with `fields`, the image size numbers, the
    bbox 4 numbers."""
    if not isinstance(entry, dict) or any(f not in entry for f in fields):
        return False
    if key == "images":
        return all(isinstance(entry[f], (int, float)) for f in ("width", "height"))
    if key == "annotations":
        box = entry["bbox"]
        return isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    return True


def read_coco_json(path, evaluated: bool = False) -> COCO:
    """The COCO-format json at `path` as a pycocotools COCO. DataError naming the file when it is not JSON, lacks
    the images / annotations / categories lists, or has entries without the fields in FIELDS (width, height and
    bbox numbers; evaluated: also EVAL_FIELDS, which COCOeval reads), counting them and showing the first."""
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except ValueError as e:  # json's decode errors and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in FIELDS if not isinstance(dataset, dict) or not isinstance(dataset.get(k), list)]
    if missing:
        raise DataError(f"{path} has no {' / '.join(map(repr, missing))} list; a COCO-format json is an object with "
                        "'images', 'annotations' and 'categories' lists (see data/README.md)")
    problems = []
    for key, fields in FIELDS.items():
        fields += EVAL_FIELDS if evaluated and key == "annotations" else ()
        bad = [e for e in dataset[key] if not well_formed(key, e, fields)]
        if bad:
            notes = {"images": ["width, height: numbers"], "annotations": ["bbox: 4 numbers"]}.get(key, [])
            notes += ["COCOeval reads iscrowd and area"] if evaluated and key == "annotations" else []
            problems.append(f"{len(bad)} of its {len(dataset[key])} {key} lack one of {', '.join(fields)}"
                            f"{' (' + '; '.join(notes) + ')' if notes else ''} (the first: {str(bad[0])[:200]})")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return quiet_coco(dataset)


def to_image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255)  # (3, H, W)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Horizontal flip of xyxy pixel boxes in an image `width` wide (mmdet's `bbox_flip`: x -> W - x)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)  # (N, 4)


class CocoDetection(torch.utils.data.Dataset):
    """Images in `img_dir` annotated by the COCO-format `ann_file` (COCO 2017 or your own): class names and their
    order from the json's categories, sorted by id. Validation keeps every image (those without annotations
    too, as COCOeval counts their detections as false positives); training keeps those with a usable box."""

    task = "detection"

    def __init__(self, img_dir, ann_file, train: bool = False, seed: int = 0, masks: bool = False):
        self.img_dir, self.train, self.seed, self.masks, self.epoch = Path(img_dir), train, seed, masks, 0
        if not Path(ann_file).is_file():
            raise FileNotFoundError(f"annotation file {ann_file} not found; see data/README.md for the layout")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.img_dir} does not exist; see data/README.md")
        self.coco = read_coco_json(ann_file, evaluated=not train)  # validation is scored by COCOeval
        self.cat_ids = sorted(self.coco.getCatIds())  # class k <-> COCO id cat_ids[k] (COCO's ids skip numbers)
        self.label_of = {c: k for k, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.ids = sorted(self.coco.imgs)
        if train:
            self.ids = [i for i in self.ids if len(self.annotations(i)[0])]

    def annotations(self, image_id: int):
        """(boxes float32 (N, 4) xyxy clipped to the image, labels int64 (N,), the N annotation dicts). As mmdet's
        `_parse_ann_info`: dropped when outside the image, of zero area, under 1 pixel wide or high, or of an
        unknown category; crowd boxes dropped too (see the module docstring)."""
        info = self.coco.imgs[image_id]
        w, h = info["width"], info["height"]
        boxes, labels, anns = [], [], []
        for ann in self.coco.imgToAnns[image_id]:
            x, y, bw, bh = ann["bbox"]
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            if ann.get("iscrowd", 0) or ann.get("ignore", False) or ann["category_id"] not in self.label_of:
                continue
            if x2 <= x1 or y2 <= y1 or ann.get("area", 1) <= 0 or bw < 1 or bh < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of[ann["category_id"]])
            anns.append(ann)
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
                anns)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info["file_name"]
        image = read_image(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} (w x h) but its annotation says "
                             f"{info['width']}x{info['height']}")
        boxes, labels, anns = self.annotations(image_id)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(image_id, dtype=torch.int64)}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]) if anns else
                                               np.zeros((0, *image.shape[:2]), np.uint8))  # (N, H, W)
        image = to_image_tensor(image)
        if self.train and sample_rng(self.seed, self.epoch, index).random() < 0.5:  # mmdet's flip_ratio 0.5
            image, target["boxes"] = image.flip(-1), flip_boxes(target["boxes"], image.shape[-1])
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


class ProceduralDetection(torch.utils.data.Dataset):
    """The built-in shapes (data.render_shapes) as a detection dataset: every visible shape is an object (box
    around its visible pixels, its instance mask, class = the shape); shapes overlap, later ones on top. Classes
    are the 7 shapes (COCO ids 1..7, their segmentation labels); no background class.

    train: sample `index` of `epoch` is drawn from sample_rng(seed, epoch, index), so every epoch brings new
    images (no flip: the shapes are already at random angles); `length` is the epoch size. val: a fixed set that
    depends on neither seed nor epoch (the segmentation val images), with an in-memory COCO ground truth."""

    task = "detection"
    MIN_PIXELS = 16  # fewer visible pixels than a 4x4 patch (a shape nearly covered by others): not an object

    def __init__(self, split: str = "train", size: int = 128, length: Optional[int] = None, seed: int = 0,
                 masks: bool = False):
        if split not in ("train", "val"):
            raise ValueError(f"ProceduralDetection split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.seed, self.masks, self.epoch = split, size, seed, masks, 0
        self.length = length if length is not None else (2000 if split == "train" else 200)
        self.class_names, self.cat_ids = list(SHAPE_CLASSES[1:]), list(range(1, len(SHAPE_CLASSES)))
        self._coco = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int):
        """uint8 (S, S, 3) image, float32 (N, 4) xyxy boxes, int64 (N,) labels, bool (N, S, S) visible masks."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        if self.split == "train":
            rng = sample_rng(self.seed, self.epoch, index)
        else:  # the segmentation val set's images
            rng = np.random.default_rng([ProceduralShapes.VAL_SEED, index, 2**32 - 1])
        image, _, inst, classes = render_shapes(rng, self.size, instances=True)
        masks = inst[None] == np.arange(1, len(classes) + 1)[:, None, None]  # (n, S, S)
        keep = masks.sum((1, 2)) >= self.MIN_PIXELS
        masks, labels = masks[keep], np.array(classes, np.int64)[keep] - 1
        boxes = np.zeros((len(masks), 4), np.float32)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # pixel edges: a box covers whole pixels
        return image, torch.from_numpy(boxes), torch.from_numpy(labels), masks

    def __getitem__(self, index: int):
        image, boxes, labels, masks = self.raw(index)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(index, dtype=torch.int64)}
        if self.masks:
            target["masks"] = torch.from_numpy(masks.astype(np.uint8))  # (N, S, S)
        return to_image_tensor(image), target

    @property
    def coco(self) -> COCO:
        """The ground truth as pycocotools sees a COCO json: image ids = indices, annotation ids from 1 (COCOeval
        treats id 0 as 'unmatched'), area = visible pixels (COCO's area is the mask's, not the box's)."""
        if self._coco is None:
            images, anns = [], []
            for index in range(self.length):
                _, boxes, labels, masks = self.raw(index)
                images.append({"id": index, "width": self.size, "height": self.size, "file_name": f"{index:06d}"})
                for box, label, m in zip(boxes.tolist(), labels.tolist(), masks):
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode()
                    anns.append({"id": len(anns) + 1, "image_id": index, "category_id": self.cat_ids[label],
                                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                 "area": int(m.sum()), "iscrowd": 0, "segmentation": rle})
            cats = [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.class_names)]
            self._coco = quiet_coco({"images": images, "annotations": anns, "categories": cats})
        return self._coco


class CocoEvaluator:
    """Box AP (and, for detections with masks, mask AP) as COCO defines it: detections become COCO results (xywh in
    original pixels, masks as RLE, the dataset's own category ids), every rank's are gathered, and COCOeval scores
    them against `dataset.coco` over exactly the images evaluated. Same interface as metrics.ConfusionMatrix:
    update, reduce_from_all_processes, compute, format_table."""

    def __init__(self, dataset):
        self.gt, self.cat_ids = dataset.coco, list(dataset.cat_ids)
        self.images = []  # (dataset index, image id, [bbox result dicts], [segm result dicts])
        self._evals, self.summaries = {}, {}

    def update(self, index: int, image_id: int, det: dict):
        """det: a detector output for one image: boxes (n, 4) xyxy, scores (n,), labels (n,) in 0..K-1, and for
        Mask R-CNN masks uint8 (n, H, W) at the image's original size (then scored with the box's score, as
        mmdet's segm results)."""
        boxes = det["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (n, 4)
        scores, labels = det["scores"].detach().float().cpu().tolist(), det["labels"].tolist()
        results = [{"image_id": image_id, "category_id": self.cat_ids[label], "bbox": box, "score": score}
                   for box, score, label in zip(xywh.tolist(), scores, labels)]
        segm = []
        if "masks" in det:
            masks = det["masks"].detach().to(torch.uint8).cpu().permute(1, 2, 0).numpy()  # (H, W, n)
            rles = mask_utils.encode(np.asfortranarray(masks)) if len(scores) else []
            for rle, score, label in zip(rles, scores, labels):
                rle["counts"] = rle["counts"].decode()  # bytes -> str: JSON-writable, as COCO files store it
                segm.append({"image_id": image_id, "category_id": self.cat_ids[label], "segmentation": rle,
                             "score": score})
        self.images.append((index, image_id, results, segm if "masks" in det else None))
        self._evals = {}

    def reduce_from_all_processes(self):
        """Gather every rank's images (unpadded shards: each image once), in dataset order on every rank, so the
        result list and COCOeval's tie-breaking do not depend on the number of processes."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.images)
            self.images = [item for part in parts for item in part]
        self.images.sort(key=lambda item: item[0])
        self._evals = {}

    @property
    def iou_types(self) -> tuple:
        """("bbox",), or ("bbox", "segm") when the detections came with masks."""
        return ("bbox", "segm") if self.images and all(item[3] is not None for item in self.images) else ("bbox",)

    @property
    def results(self) -> list:
        """The detections as a COCO results list (what eval.py --out writes)."""
        return [r for _, _, results, _ in self.images for r in results]

    @property
    def segm_results(self) -> list:
        """The masks as a COCO segm results list (RLE; what eval.py --out writes next to the boxes)."""
        return [r for _, _, _, segm in self.images for r in segm or []]

    def coco_eval(self, iou_type: str = "bbox") -> COCOeval:
        if iou_type not in self.iou_types:
            raise ValueError(f"no {iou_type!r} results to evaluate (the detections have {self.iou_types})")
        if iou_type not in self._evals:
            # loadRes adds keys to the dicts it is given: a copy
            results = copy.deepcopy(self.results if iou_type == "bbox" else self.segm_results)
            with contextlib.redirect_stdout(io.StringIO()):
                if results:
                    dt = self.gt.loadRes(results)
                else:  # loadRes cannot take an empty list: no detections at all score AP 0
                    dt = quiet_coco({"images": self.gt.dataset["images"], "annotations": [],
                                     "categories": copy.deepcopy(self.gt.dataset["categories"])})
                ev = COCOeval(self.gt, dt, iou_type)
                ev.params.imgIds = sorted(item[1] for item in self.images)
                ev.evaluate()
                ev.accumulate()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                ev.summarize()
            self.summaries[iou_type] = out.getvalue().rstrip()  # COCO's standard 12 lines
            self._evals[iou_type] = ev
        return self._evals[iou_type]

    @property
    def summary(self) -> str:
        """COCOeval's 12-line box summary."""
        self.coco_eval("bbox")
        return self.summaries["bbox"]

    def class_ap(self, iou_type: str = "bbox") -> list:
        """AP@[.5:.95] per class (area all, 100 detections), as mmdet's classwise table; nan for a class without
        ground truth."""
        precision = self.coco_eval(iou_type).eval["precision"]  # (T ious, R recalls, K classes, A areas, M dets)
        aps = []
        for k in range(len(self.cat_ids)):
            p = precision[:, :, k, 0, -1]
            aps.append(float(p[p > -1].mean()) if (p > -1).any() else float("nan"))
        return aps

    def compute(self) -> dict:
        """COCOeval's 12 box numbers (fractions; -1 where undefined) by name (STAT_NAMES) and "class_AP"; with
        masks also "segm": the same for the masks."""
        out = {}
        for iou_type in self.iou_types:
            stats = self.coco_eval(iou_type).stats
            out[iou_type] = {**{k: float(v) for k, v in zip(STAT_NAMES, stats)}, "class_AP": self.class_ap(iou_type)}
        return {**out.pop("bbox"), **out}

    def format_table(self, class_names) -> str:
        width = max(len(n) for n in class_names)
        lines = []
        for iou_type in self.iou_types:
            self.coco_eval(iou_type)
            rows = [f"{name:<{width}}  {100 * ap:6.2f}" for name, ap in zip(class_names, self.class_ap(iou_type))]
            lines += [f"{iou_type}:", self.summaries[iou_type], "", f"{'class':<{width}}  {'AP':>6}", *rows, ""]
        return "\n".join(lines[:-1])
