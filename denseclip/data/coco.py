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
- a json that is not COCO-format, or has entries without the fields read or with values the loader would misread
  (ids that are not integers, NaN boxes, a file_name that is absolute or climbs out of the image folder), fails
  naming the file, counting them and showing the first by id (read_coco_json; mmdet raises a KeyError or a
  TypeError when it first meets one, or reads the file elsewhere). The rest of what a run reads (polygons, RLE
  sizes, masks for Mask R-CNN, ...) is checked by the pre-flight (preflight_coco.py).
"""
import contextlib
import io
import json
import math
import posixpath
import reprlib
import sys
from pathlib import Path, PureWindowsPath
from typing import Optional

import numpy as np
import torch
from pycocotools.coco import COCO

from ..errors import DataError, MissingFileError
from .image_io import read_image
from .transforms import sample_rng

# The fields of each entry that pycocotools' index and this loader read (a missing one is a KeyError mid-run);
# COCOeval also reads a ground-truth annotation's iscrowd and area.
FIELDS = {"images": ("id", "file_name", "width", "height"), "annotations": ("id", "image_id", "category_id", "bbox"),
          "categories": ("id", "name")}
EVAL_FIELDS = ("iscrowd", "area")
ENTRY = {"images": "image", "annotations": "annotation", "categories": "category"}  # how one entry is named
ID_LIMIT = 2 ** 53  # ids are used as dict keys, as int64 image_id tensors, and by COCOeval as float64 (exact to 2^53)
SHOWN = reprlib.Repr()  # how a bad value is quoted: short, and safe on any nesting (json.load's limit is ~1000 levels)
SHOWN.maxlevel, SHOWN.maxstring, SHOWN.maxother = 3, 60, 60


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO of an in-memory COCO-format dict, without its progress prints on every rank."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def is_id(value) -> bool:
    """A JSON integer (not true / false, which Python counts as 1 / 0; not 3.0 or "3") within +-2^53."""
    return type(value) is int and -ID_LIMIT <= value <= ID_LIMIT


def is_number(value) -> bool:
    """A finite JSON number (json.load reads NaN, Infinity and 1e999 as floats: none is a pixel position)."""
    return type(value) in (int, float) and math.isfinite(value)


def path_problem(name) -> Optional[str]:
    """Why an image's file_name cannot be read under the image folder, or None. It must be a relative path that
    stays inside the folder: an absolute one or one that climbs out with '..' would read (and, for pictures named
    after it, write) files elsewhere. Symbolic links inside the folder are followed: they were put there by
    whoever made the folder, not read from the json."""
    if type(name) is not str or not name.strip():
        return "is not a non-empty string"
    if "\0" in name:
        return "holds a NUL character"
    name = name.replace("\\", "/")  # a Windows-made json: its separators, and its drives, are refused too
    if name.startswith("/") or PureWindowsPath(name).drive:
        return "is absolute (file_name is relative to the image folder)"
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return "climbs out of the image folder ('..')"
    return "names the image folder itself" if normal == "." else None


def entry_problems(key: str, entry: dict, evaluated: bool):
    """(field, what is wrong) for each field of one images / annotations / categories entry that the loader,
    pycocotools or COCOeval would choke on or silently misread."""
    problems = [(f, "missing") for f in FIELDS[key] + (EVAL_FIELDS if evaluated and key == "annotations" else ())
                if f not in entry]
    ids = ("id", "image_id", "category_id") if key == "annotations" else ("id",)
    problems += [(f, "not an integer within +-2^53") for f in ids if f in entry and not is_id(entry[f])]
    if key == "images":
        problems += [(f, "not a positive whole number of pixels") for f in ("width", "height")
                     if f in entry and not (is_id(entry[f]) and entry[f] > 0)]
        why = path_problem(entry["file_name"]) if "file_name" in entry else None
        problems += [("file_name", why)] if why else []
    elif key == "annotations":
        box = entry.get("bbox", [])
        if "bbox" in entry and not (type(box) is list and len(box) == 4 and all(map(is_number, box))):
            problems.append(("bbox", "not 4 finite numbers [x, y, width, height]"))
        if "iscrowd" in entry and entry["iscrowd"] not in (0, 1):  # True / False are 1 / 0 too
            problems.append(("iscrowd", "not 0 or 1"))
        if "area" in entry and not is_number(entry["area"]):
            problems.append(("area", "not a finite number"))
    elif "name" in entry and type(entry["name"]) is not str:
        problems.append(("name", "not a string (the text encoder reads it)"))
    return problems


def json_problems(dataset: dict, evaluated: bool):
    """Lines of what in a parsed COCO-format json (with its three lists) the loader cannot read: each kind counted,
    the first entry named by its id (or by its position when the id is the problem) with the value."""
    kinds = {}  # (key, field, what) -> [count, the first offender]
    for key in FIELDS:
        for index, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict):
                kinds.setdefault((key, "", "not an object"), [0, f"{key}[{index}]: {SHOWN.repr(entry)}"])[0] += 1
                continue
            for field, what in entry_problems(key, entry, evaluated):
                name = f"{ENTRY[key]} id {entry['id']}" if field != "id" and is_id(entry.get("id")) \
                    else f"{key}[{index}]"
                value = f": {field} {SHOWN.repr(entry[field])}" if field in entry else ""
                kinds.setdefault((key, field, what), [0, name + value])[0] += 1
    return [f"{n} of its {len(dataset[key])} {key}: {field + ' ' if field else ''}{what} (the first: {first})"
            for (key, field, what), (n, first) in kinds.items()]


def read_coco_json(path, evaluated: bool = False) -> COCO:
    """The COCO-format json at `path` as a pycocotools COCO. DataError naming the file when it cannot be read, is
    not JSON (or is nested too deep to parse), lacks the images / annotations / categories lists, or has entries
    whose fields (FIELDS; evaluated: also EVAL_FIELDS, which COCOeval reads) are missing or of a kind the loader
    cannot use (json_problems): each kind counted, the first offender named by id, field and value."""
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to parse (over ~{sys.getrecursionlimit()} levels of [ or "
                        "{); a COCO-format json is a few levels deep") from None
    except ValueError as e:  # json's decode errors and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e}") from e
    missing = [k for k in FIELDS if not isinstance(dataset, dict) or not isinstance(dataset.get(k), list)]
    if missing:
        raise DataError(f"{path} has no {' / '.join(map(repr, missing))} list; a COCO-format json is an object with "
                        "'images', 'annotations' and 'categories' lists (see data/README.md)")
    problems = json_problems(dataset, evaluated)
    if problems:
        lines = "".join(f"\n  {p}" for p in problems) if len(problems) > 1 else f" {problems[0]}"
        raise DataError(f"{path}:{lines}")
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
            raise MissingFileError(f"annotation file {ann_file} not found; see data/README.md for the layout")
        if not self.img_dir.is_dir():
            raise MissingFileError(f"image folder {self.img_dir} does not exist; see data/README.md")
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

    def image_file(self, image_id: int) -> Path:
        """The file of an image (its file_name is relative and stays inside img_dir: read_coco_json)."""
        return self.img_dir / self.coco.imgs[image_id]["file_name"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info, path = self.coco.imgs[image_id], self.image_file(image_id)
        image = read_image(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image {path} is {image.shape[1]}x{image.shape[0]} (w x h) but its annotation says "
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


