"""Segmentation data: ADE20K and user folders in mmseg's layout, and a built-in procedural dataset.

Every dataset returns ``(image, label)``: a float32 (3, H, W) image normalised with CLIP's mean/std and an int64
(H, W) label in which 255 means "ignore". Each has ``class_names``.

Randomness is reproducible and resumable: all random draws for one sample come from
``np.random.default_rng([seed, epoch, index])`` (see ``sample_rng``), so a sample is bit-identical in any process,
DataLoader worker, or after a resume. Call ``set_epoch`` on the dataset before building the epoch's iterator
(with ``persistent_workers=True`` the workers keep the epoch they were started with).

The training and test transforms (mmseg's pipeline) are in transforms.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .configs import check_class_names
from .errors import DataError, MissingFileError
from .transforms import IGNORE_INDEX, TestTransform, TrainTransform, normalize

# mmseg's ADE20KDataset.CLASSES, verbatim: 'bed ' really has a trailing space there (the text side strips names).
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel',
    'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], Tuple[torch.Tensor, torch.Tensor]]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one source of randomness for sample `index` of `epoch`: independent of process, worker and history."""
    return np.random.default_rng([seed, epoch, index])


# ---------------------------------------------------------------------------------------- files on disk

EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held (1 = upright, 5..8 = quarter turns)


def oriented_size(im: Image.Image) -> Tuple[int, int]:
    """(width, height) of an opened, not decoded, image once turned upright; only the header is read."""
    w, h = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if "exif" in im.info else 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB, as mmseg's loader (OpenCV's IMREAD_COLOR) reads it: turned upright by the EXIF
    orientation, grey and palette images expanded to RGB, alpha dropped, 16-bit values cut to their high byte.
    A file that cannot be decoded is an error naming it, never a skipped sample."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: OpenCV keeps the high byte (>> 8)
                grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}; replace or remove the file "
                        "(python -m denseclip.preflight --check-data full lists every such file)") from e


def read_label(path: Path, reduce_zero_label: bool, num_classes: int) -> np.ndarray:
    """Class-index map (H, W) as stored (no EXIF turn: mmseg reads labels 'unchanged'); with reduce_zero_label
    0 -> 255 and k -> k-1 (mmseg's uint8 arithmetic)."""
    try:
        with Image.open(path) as im:
            label = np.asarray(im)  # palette ('P'), grey and 16-bit PNGs all give the stored indices
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read label {path}: {e}; replace or remove the file") from e
    if label.ndim != 2:
        raise DataError(f"label {path} has shape {label.shape}; expected a single-channel (H, W) class-index PNG "
                        "(grey or palette), not a colour picture")
    label = label.astype(np.int64)
    if reduce_zero_label:
        label = np.where((label == 0) | (label == 255), 255, label - 1)
    bad = ((label >= num_classes) & (label != IGNORE_INDEX)) | (label < 0)
    if bad.any():
        raise DataError(f"label {path} has values {np.unique(label[bad])[:10].tolist()} outside 0..{num_classes - 1}"
                        f" and {IGNORE_INDEX} (ignore); check the class names and --reduce-zero-label")
    return label.astype(np.uint8)


def find_pairs(img_dir: Path, ann_dir: Path, img_suffix: str, seg_suffix: str):
    """Match images and labels by relative path and stem. Returns (pairs [(image, label)], images without a
    label, labels without an image), each sorted; every file with the suffix is accounted for."""
    images = sorted(p.relative_to(img_dir).as_posix() for p in img_dir.rglob(f"*{img_suffix}") if p.is_file())
    labels = {p.relative_to(ann_dir).as_posix() for p in ann_dir.rglob(f"*{seg_suffix}") if p.is_file()} \
        if ann_dir.is_dir() else set()
    pairs, no_label = [], []
    for rel in images:
        ann = rel[: -len(img_suffix)] + seg_suffix
        if ann in labels:
            pairs.append((img_dir / rel, ann_dir / ann))
            labels.discard(ann)
        else:
            no_label.append(img_dir / rel)
    return pairs, no_label, sorted(ann_dir / rel for rel in labels)


def read_class_names(class_names: Union[Sequence[str], str, Path]) -> list:
    """A list of names, or a text file with one name per line (blank lines skipped)."""
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise MissingFileError(f"class-name file {path} not found (expected one class name per line)")
        class_names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return check_class_names(class_names)


class FolderSegmentation(torch.utils.data.Dataset):
    """Images in `img_dir` with labels of the same relative path and stem in `ann_dir` (mmseg's CustomDataset)."""

    def __init__(self, img_dir, ann_dir, class_names, transform: Optional[Transform] = None, img_suffix=".jpg",
                 seg_suffix=".png", reduce_zero_label=False, seed: int = 0):
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        self.class_names = read_class_names(class_names)
        if len(self.class_names) > IGNORE_INDEX:
            raise ValueError(f"{len(self.class_names)} classes do not fit uint8 labels with {IGNORE_INDEX} = ignore")
        self.transform = transform if transform is not None else TestTransform()
        self.reduce_zero_label, self.seed, self.epoch = reduce_zero_label, seed, 0
        if not self.img_dir.is_dir():
            raise MissingFileError(f"image folder {self.img_dir} does not exist; see data/README.md for the layout")
        self.samples, no_label, _ = find_pairs(self.img_dir, self.ann_dir, img_suffix, seg_suffix)
        if no_label:
            raise MissingFileError(f"{len(no_label)} image(s) without an annotation in {self.ann_dir}, e.g. "
                                   f"{no_label[0]} (expected its label {self.ann_dir}/<same stem>{seg_suffix}); "
                                   "python -m denseclip.preflight lists them all")
        if not self.samples:
            raise MissingFileError(f"no '*{img_suffix}' images found under {self.img_dir}; "
                                   "see data/README.md for the expected layout")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        label = read_label(ann_path, self.reduce_zero_label, len(self.class_names))
        if image.shape[:2] != label.shape:
            raise DataError(f"image {img_path} is {image.shape[:2]} but its label {ann_path} is {label.shape}")
        return self.transform(image, label, sample_rng(self.seed, self.epoch, index))


class ADE20K(FolderSegmentation):
    """ADEChallengeData2016 in mmseg's layout; label 0 ("other") is ignored and 1..150 become 0..149."""

    def __init__(self, root="data/ade/ADEChallengeData2016", split: str = "training",
                 transform: Optional[Transform] = None, seed: int = 0):
        if split not in ("training", "validation"):
            raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
        if transform is None:
            transform = TrainTransform() if split == "training" else TestTransform()
        root = Path(root)
        super().__init__(root / "images" / split, root / "annotations" / split, list(ADE20K_CLASSES), transform,
                         reduce_zero_label=True, seed=seed)


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
