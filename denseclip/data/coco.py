"""Detection data: COCO (or any COCO-format dataset) through pycocotools. The procedural shapes with boxes are in
procedural.py; COCO's box and mask AP (COCOeval) in run/coco_eval.py.

Mirrors mmdet 2.17's `CocoDataset` (annotation parsing, image filtering, class-wise AP) and `RandomFlip`.
Every dataset returns `(image, target)`:
  image   float32 (3, H, W) RGB in [0, 1] at the image's original size (training: flipped with p = 0.5); the
          detector's own transform resizes, normalises and pads, and maps its boxes back to these pixels
  target  {"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,) in 0..K-1, "image_id": int64 scalar,
           "masks": uint8 (N, H, W) only when built with masks=True}
and has `class_names`, `cat_ids` (the COCO category id of class k), `coco` (the ground truth as a pycocotools
COCO object, which evaluation scores against), `set_epoch`, and `task = "detection"` (batched by
the detection task's collate). Random draws come from transforms.sample_rng(seed, epoch, index): resumes are exact.

Differences from mmdet, on purpose:
- boxes are clipped to the image (mmdet keeps coordinates outside it, which a flip then maps to the wrong side);
- crowd boxes are left out of training targets (mmdet passes them as `gt_bboxes_ignore`, which RetinaNet's
  assigner, `ignore_iof_thr=-1`, does not use: the same training); COCOeval still uses them, as COCO defines;
- training skips images without a usable box (mmdet keeps an image whose only annotations are crowd ones);
- a json that is not COCO-format or has entries without the fields read fails naming the file and counting them
  (read_coco_json; mmdet raises a KeyError when it first meets one).
"""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from ..errors import DataError
from .image_io import read_image
from .transforms import sample_rng

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


def category_names(gt: COCO, cat_ids, ann_file) -> list:
    """The categories' names in id order. Names are what the text encoder tells classes apart by, so an empty or a
    repeated one (after stripping spaces) is a DataError naming the json and the category ids."""
    ids = {}
    for c in cat_ids:
        ids.setdefault(str(gt.cats[c]["name"]).strip(), []).append(c)
    if "" in ids:
        raise DataError(f"{ann_file}: the json's categories with id(s) {ids['']} have an empty name; every category "
                        "needs one (the text encoder reads it)")
    repeated = [f"{n!r} (ids {', '.join(map(str, c))})" for n, c in ids.items() if len(c) > 1]
    if repeated:
        raise DataError(f"{ann_file}: the json's categories repeat the name(s) {'; '.join(repeated[:10])}; each "
                        "category needs its own name (the text encoder tells classes apart by it): rename or merge "
                        "them")
    return [gt.cats[c]["name"] for c in cat_ids]


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
        self.class_names = category_names(self.coco, self.cat_ids, ann_file)
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


