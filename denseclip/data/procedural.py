"""The built-in procedural data: shapes named by real English words on varied backgrounds, generated on the fly (no
files, no downloads), as a segmentation dataset (ProceduralShapes) and a detection dataset with boxes and instance
masks (ProceduralDetection). `python train.py` learns on it in minutes on a CPU.

Randomness is per sample, from transforms.sample_rng(seed, epoch, index): resumes are exact.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .coco import quiet_coco, to_image_tensor
from .transforms import normalize, sample_rng


# ------------------------------------------------------------------------------------ procedural shapes
# Shape masks on object-frame coordinates (u, v), the object's radius being 1; areas are of similar size so that
# no class wins by pixel count alone.
SHAPE_CLASSES = ("background", "circle", "square", "triangle", "star", "ring", "cross", "heart")



def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    if cls == 1:  # circle
        return r <= 0.9
    if cls == 2:  # square
        return np.maximum(abs(u), abs(v)) <= 0.75
    if cls == 3:  # equilateral triangle, vertices on the unit circle: inside all three edges at distance 1/2
        return np.all([u * math.cos(a) + v * math.sin(a) <= 0.5 for a in (math.pi / 2, 7 * math.pi / 6,
                                                                         11 * math.pi / 6)], axis=0)
    if cls == 4:  # five-pointed star: boundary radius goes 1 (tips) -> 0.4 (notches) linearly in angle
        phase = (np.arctan2(v, u) * 5 / (2 * math.pi)) % 1.0
        return r <= 0.4 + 0.6 * np.abs(phase - 0.5) * 2
    if cls == 5:  # ring
        return (r <= 1.0) & (r >= 0.6)
    if cls == 6:  # cross (plus sign)
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    x, y = 1.15 * u, 0.1 - 1.15 * v  # heart: the curve (x^2 + y^2 - 1)^3 = x^2 y^3, point up in image coordinates
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0



def _two_colours(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Blend two random colours by weight map t in [0, 1] -> (H, W, 3) float."""
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)



def render_shapes(rng: np.random.Generator, size: int, instances: bool = False):
    """One image (uint8 (S, S, 3)) and label (uint8 (S, S)): a textured background and 1-4 shapes, later ones on
    top. Colours are drawn independently of the class, so colour alone cannot tell the classes apart.
    With `instances`, also the instance map (uint8 (S, S): 0 background, i the i-th shape drawn, where it is
    visible) and the list of the shapes' classes; the random draws, hence image and label, are the same."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    along = (xx * math.cos(a) + yy * math.sin(a)) / size  # a coordinate along a random direction, ~[-1.4, 1.4]
    across = (-xx * math.sin(a) + yy * math.cos(a)) / size
    kind = rng.integers(5)
    if kind == 0:  # flat
        img = _two_colours(rng, np.zeros_like(xx))
    elif kind == 1:  # linear gradient
        img = _two_colours(rng, (along - along.min()) / (np.ptp(along) + 1e-6))
    elif kind == 2:  # stripes
        img = _two_colours(rng, (np.sin(2 * math.pi * rng.uniform(2, 10) * along) > 0).astype(np.float32))
    elif kind == 3:  # checkerboard
        n = rng.uniform(2, 8)
        img = _two_colours(rng, ((np.floor(along * n) + np.floor(across * n)) % 2).astype(np.float32))
    else:  # smooth colour noise: a k x k grid of random colours, bilinearly upsampled
        k = int(rng.integers(2, 7))
        grid = Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
        img = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32)
    label, inst, classes = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8), []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        classes.append(cls)
        cx, cy = rng.uniform(0, size, 2)
        rad = rng.uniform(0.1, 0.3) * size
        th = rng.uniform(0, 2 * math.pi)
        shade = rng.uniform(0, 1) if rng.integers(2) else 0.0  # flat fill, or a gradient of random strength
        # Only the object's bounding square is evaluated: a large saving for small objects.
        y0, y1 = max(int(cy - 1.1 * rad), 0), min(int(cy + 1.1 * rad) + 2, size)
        x0, x1 = max(int(cx - 1.1 * rad), 0), min(int(cx + 1.1 * rad) + 2, size)
        fill = _two_colours(rng, along[y0:y1, x0:x1] * shade)
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * math.cos(th) + dy * math.sin(th)) / rad
        v = (-dx * math.sin(th) + dy * math.cos(th)) / rad
        m = _shape_mask(cls, u, v)
        img[y0:y1, x0:x1][m] = fill[m]
        label[y0:y1, x0:x1][m] = cls
        inst[y0:y1, x0:x1][m] = len(classes)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 10)  # sensor-like noise
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img, label, inst, classes) if instances else (img, label)



class ProceduralShapes(torch.utils.data.Dataset):
    """The built-in dataset: shapes named by real English words (so CLIP's text encoder has something to say
    about them) on varied backgrounds, generated on the fly; no files, no downloads.

    train: sample `index` of `epoch` comes from sample_rng(seed, epoch, index), so each epoch sees new images and
    `length` is only the epoch size. val: a fixed set of `length` (default 200) images that depends on neither
    `seed` nor the epoch, so numbers from different runs compare."""

    background = True  # class 0 is 'background' (the zero-shot protocol's low-confidence class)
    VAL_SEED = 0x5EED  # val images use entropy (VAL_SEED, index, 2**32 - 1): no train (seed, epoch, index) reaches it

    def __init__(self, split: str = "train", size: int = 128, length: Optional[int] = None, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"ProceduralShapes split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.seed, self.epoch = split, size, seed, 0
        self.length = length if length is not None else (20000 if split == "train" else 200)
        self.class_names = list(SHAPE_CLASSES)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The sample before normalisation: uint8 (S, S, 3) RGB image and uint8 (S, S) label."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        if self.split == "train":
            rng = sample_rng(self.seed, self.epoch, index)
        else:
            rng = np.random.default_rng([self.VAL_SEED, index, 2**32 - 1])
        return render_shapes(rng, self.size)

    def __getitem__(self, index: int):
        image, label = self.raw(index)
        return normalize(image), torch.from_numpy(label.astype(np.int64))


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
