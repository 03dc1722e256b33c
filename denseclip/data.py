"""Segmentation data: ADE20K and user folders in mmseg's layout, a built-in procedural dataset, and the transforms.

Every dataset returns ``(image, label)``: a float32 (3, H, W) image normalised with CLIP's mean/std and an int64
(H, W) label in which 255 means "ignore". Each has ``class_names``.

Randomness is reproducible and resumable: all random draws for one sample come from
``np.random.default_rng([seed, epoch, index])`` (see ``sample_rng``), so a sample is bit-identical in any process,
DataLoader worker, or after a resume. Call ``set_epoch`` on the dataset before building the epoch's iterator
(with ``persistent_workers=True`` the workers keep the epoch they were started with).

The transforms mirror mmseg 0.x's pipeline used by the official DenseCLIP configs (Resize with ``ratio_range``,
RandomCrop with ``cat_max_ratio``, RandomFlip, PhotoMetricDistortion, Normalize, Pad), including its draw order and
the quirk that after ten rejected crops the eleventh is taken unchecked. Differences from mmseg/mmcv:
- the global ``np.random`` state is replaced by the per-sample generator (same distributions, different streams);
- images are RGB throughout (mmseg loads BGR and swaps in Normalize): no operation mixes channels differently;
- Normalize divides by 255 first, then applies CLIP's mean/std (mmseg: mean/std scaled by 255): float rounding only;
- OpenCV is not a dependency: bilinear/nearest resizing and the 8-bit HSV conversions are NumPy re-implementations
  of OpenCV's integer and float arithmetic, bit-exact with opencv-python 4.5/4.8 (x86, AVX2 build) in our checks.
Crop, flip, pad and ``reduce_zero_label`` match exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics, for pixels scaled to [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = 255

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


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) with CLIP's mean/std."""
    x = image.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


# ----------------------------------------------------------------------------------------------- geometric ops

def rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv.rescale_size: the largest keep-ratio size fitting long edge <= max(scale), short edge <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def _linear_taps(old: int, new: int, clamp: bool):
    """OpenCV's INTER_LINEAR taps along one axis: source indices and 11-bit fixed-point weights (sum 2048)."""
    f = ((np.arange(new) + 0.5) * (1.0 / (new / old)) - 0.5).astype(np.float32)  # double, then float, as OpenCV
    i = np.floor(f).astype(np.int64)
    f -= i.astype(np.float32)
    if clamp:  # OpenCV clamps weights at the borders along x; along y it keeps them and only clamps the rows
        f[i < 0], i[i < 0] = 0, 0
        f[i >= old - 1], i[i >= old - 1] = 0, old - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    return np.clip(i, 0, old - 1), np.clip(i + 1, 0, old - 1), w0, w1


def resize_image(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) for uint8 (H, W, C), bit-exact with opencv-python 4.5/4.8 (checked on random
    images): a horizontal pass in integers, then OpenCV's vectorised vertical pass (pre-shift by 4, 16-bit
    multiply-high, round by 2 bits)."""
    x0, x1, a0, a1 = _linear_taps(image.shape[1], w, clamp=True)
    y0, y1, b0, b1 = _linear_taps(image.shape[0], h, clamp=False)
    # int32 is enough: 255 * 2048 >> 4 = 32640, times 2048 < 2^31. In-place ops keep the big temporaries few.
    rows = (image[:, x0].astype(np.int32) * a0[:, None] + image[:, x1].astype(np.int32) * a1[:, None]) >> 4
    out = rows[y0]  # (h, w, C)
    out *= b0[:, None, None]
    out >>= 16
    low = rows[y1]
    low *= b1[:, None, None]
    out += low >> 16
    out += 2
    out >>= 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, w: int, h: int) -> np.ndarray:
    """OpenCV INTER_NEAREST exactly: source index floor(x * (1 / (new / old))), computed in double as OpenCV does."""
    def index(old, new):
        return np.minimum(np.floor(np.arange(new) * (1.0 / (new / old))).astype(np.int64), old - 1)
    return label[index(label.shape[0], h)[:, None], index(label.shape[1], w)[None, :]]


# ----------------------------------------------------------------------------- OpenCV's 8-bit HSV, in NumPy
# H is stored in [0, 180) so that it fits a byte (OpenCV's convention, which mmseg's hue shift assumes).
_HSV_SHIFT = 12
_DIV = np.arange(256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.round((255 << _HSV_SHIFT) / _DIV[1:])]).astype(np.int32)
_HDIV = np.concatenate([[0], np.round((180 << _HSV_SHIFT) / (6.0 * _DIV[1:]))]).astype(np.int32)
# Which of (v, v(1-s), v(1-s*f), v(1-s(1-f))) each of R, G, B takes in each of the six hue sectors.
_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(RGB2HSV) for uint8: integer tables with 12 fractional bits."""
    rgb = image.astype(np.int32)  # the largest product, 255 * sdiv[1] = 255 * 255 * 4096, fits int32
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = image.max(-1).astype(np.int32)
    diff = v - image.min(-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(HSV2RGB) for uint8 (H, W, 3) as opencv-python's AVX2 build computes it, bit-exact with OpenCV
    4.5/4.8 on all 2^24 inputs: float32 sector formula with 1 - s*f fused (FMA). Each row goes through 32-pixel
    SIMD blocks, which truncate to uint8, and a scalar tail of (W mod 32) pixels, which rounds."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    sector = np.floor(h)
    f = h - sector
    sector = sector.astype(np.int64) % 6
    one, s64 = np.float32(1.0), s.astype(np.float64)
    # s*f is exact in float64, so one rounding to float32 afterwards is the fused multiply-add's single rounding.
    tab = np.stack([v, v * (one - s), v * (1.0 - s64 * f).astype(np.float32),
                    v * (1.0 - s64 * (one - f)).astype(np.float32)], -1)  # (H, W, 4)
    rgb = np.take_along_axis(tab, _SECTORS[sector], -1) * np.float32(255.0)  # (H, W, 3)
    tail = rgb.shape[1] - rgb.shape[1] % 32
    rgb[:, tail:] = np.rint(rgb[:, tail:])
    return np.clip(rgb, 0, 255).astype(np.uint8)  # astype truncates


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
    """mmseg 0.x PhotoMetricDistortion on uint8 RGB: each step applied with probability 1/2, same order of draws."""
    def convert(x, alpha=1.0, beta=0.0):  # float, clip, then truncate to uint8 as mmseg does
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)  # mmseg's code does contrast first when mode == 1 (its comment says the opposite)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180  # [-18, 17]
        img = hsv_to_rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


# ------------------------------------------------------------------------------------------------ transforms

@dataclass
class TrainTransform:
    """mmseg 0.x training pipeline: Resize(ratio_range) -> RandomCrop(cat_max_ratio) -> RandomFlip ->
    PhotoMetricDistortion -> Normalize -> Pad. Called as ``transform(image_uint8_hwc, label_hw, rng)``."""
    scale: Tuple[int, int] = (2048, 512)  # (long, short) edge bound before the random ratio
    ratio_range: Optional[Tuple[float, float]] = (0.5, 2.0)  # None: resize to `scale` itself
    crop_size: Tuple[int, int] = (512, 512)  # (h, w)
    cat_max_ratio: float = 0.75  # re-draw crops in which one class covers this share of labelled pixels or more
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = IGNORE_INDEX

    def crop_box(self, label: np.ndarray, rng: np.random.Generator) -> Tuple[int, int]:
        """mmseg RandomCrop: up to 10 checked draws; if all fail, the 11th draw is taken unchecked."""
        ch, cw = self.crop_size

        def draw():
            return (int(rng.integers(0, max(label.shape[0] - ch, 0) + 1)),
                    int(rng.integers(0, max(label.shape[1] - cw, 0) + 1)))
        y, x = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                cnt = np.bincount(label[y:y + ch, x:x + cw].ravel(), minlength=self.ignore_index + 1)
                cnt[self.ignore_index] = 0
                cnt = cnt[cnt > 0]  # np.unique's counts, in O(n) instead of a sort
                if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < self.cat_max_ratio:
                    break
                y, x = draw()
        return y, x

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        scale = self.scale
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        w, h = rescale_size(image.shape[1], image.shape[0], scale)
        image, label = resize_image(image, w, h), resize_label(label, w, h)
        y, x = self.crop_box(label, rng)
        ch, cw = self.crop_size
        image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        # Pad comes after Normalize in mmseg, so padded image pixels are 0 in normalised space (the mean colour).
        img = normalize(image)
        out_img = img.new_zeros(3, max(ch, img.shape[1]), max(cw, img.shape[2]))
        out_img[:, :img.shape[1], :img.shape[2]] = img
        out_lbl = torch.full(out_img.shape[1:], self.ignore_index, dtype=torch.int64)
        out_lbl[:label.shape[0], :label.shape[1]] = torch.from_numpy(label.astype(np.int64))
        return out_img, out_lbl


@dataclass
class TestTransform:
    """mmseg test pipeline: keep-ratio resize of the image only and Normalize. The label stays at the original
    size because evaluation resizes the logits back to it."""
    __test__ = False  # the name starts with "Test": keep pytest from collecting it where tests import it
    scale: Tuple[int, int] = (2048, 512)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None):
        w, h = rescale_size(image.shape[1], image.shape[0], self.scale)
        return normalize(resize_image(image, w, h)), torch.from_numpy(label.astype(np.int64))


# ---------------------------------------------------------------------------------------- files on disk

def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; a file that cannot be decoded is an error naming it, never a skipped sample."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, SyntaxError) as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e


def read_label(path: Path, reduce_zero_label: bool, num_classes: int) -> np.ndarray:
    """Class-index map (H, W); with reduce_zero_label 0 -> 255 and k -> k-1 (mmseg's uint8 arithmetic)."""
    try:
        with Image.open(path) as im:
            label = np.asarray(im)  # palette ('P') and grey PNGs both give the stored indices
    except (OSError, ValueError, SyntaxError) as e:
        raise RuntimeError(f"cannot read label {path}: {e}") from e
    if label.ndim != 2:
        raise ValueError(f"label {path} has shape {label.shape}; expected a single-channel (H, W) class-index PNG")
    label = label.astype(np.int64)
    if reduce_zero_label:
        label = np.where((label == 0) | (label == 255), 255, label - 1)
    bad = ((label >= num_classes) & (label != IGNORE_INDEX)) | (label < 0)
    if bad.any():
        raise ValueError(f"label {path} has values {np.unique(label[bad])[:10].tolist()} outside 0..{num_classes - 1}"
                         f" and {IGNORE_INDEX} (ignore); check class_names and reduce_zero_label")
    return label.astype(np.uint8)


def read_class_names(class_names: Union[Sequence[str], str, Path]) -> list:
    """A list of names, or a text file with one name per line (blank lines skipped)."""
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise FileNotFoundError(f"class-name file {path} not found (expected one class name per line)")
        class_names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not class_names:
        raise ValueError("class_names is empty: at least one class is needed")
    return list(class_names)


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
            raise FileNotFoundError(f"image folder {self.img_dir} does not exist; see data/README.md for the layout")
        images = sorted(p.relative_to(self.img_dir).as_posix() for p in self.img_dir.rglob(f"*{img_suffix}"))
        if not images:
            raise FileNotFoundError(f"no '*{img_suffix}' images found under {self.img_dir}; "
                                    "see data/README.md for the expected layout")
        self.samples = []
        for rel in images:
            ann = self.ann_dir / (rel[: -len(img_suffix)] + seg_suffix)
            if not ann.is_file():
                raise FileNotFoundError(f"no annotation for image {self.img_dir / rel}: expected {ann}")
            self.samples.append((self.img_dir / rel, ann))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        label = read_label(ann_path, self.reduce_zero_label, len(self.class_names))
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {img_path} is {image.shape[:2]} but its label {ann_path} is {label.shape}")
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


def render_shapes(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """One image (uint8 (S, S, 3)) and label (uint8 (S, S)): a textured background and 1-4 shapes, later ones on
    top. Colours are drawn independently of the class, so colour alone cannot tell the classes apart."""
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
    label = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
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
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 10)  # sensor-like noise
    return np.clip(img, 0, 255).astype(np.uint8), label


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
