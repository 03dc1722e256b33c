"""mmseg 0.x's segmentation transforms, the official DenseCLIP pipeline, on uint8 RGB NumPy arrays.

TrainTransform: Resize with ``ratio_range`` -> RandomCrop with ``cat_max_ratio`` -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad, with mmseg's draw order and the quirk that after ten rejected crops
the eleventh is taken unchecked. TestTransform: keep-ratio resize of the image, Normalize. Every random draw comes
from the generator passed in (the datasets give one per (seed, epoch, index)), never from global state.
Differences from mmseg/mmcv:
- the global ``np.random`` state is replaced by the per-sample generator (same distributions, different streams);
- images are RGB throughout (mmseg loads BGR and swaps in Normalize): no operation mixes channels differently;
- Normalize divides by 255 first, then applies CLIP's mean/std (mmseg: mean/std scaled by 255): float rounding only.
OpenCV, which mmseg resizes and converts colours with, is optional. Its bilinear/nearest resizing and 8-bit HSV
conversions are re-implemented below in NumPy from OpenCV's integer and float arithmetic (bit-exact with
opencv-python 4.5, 4.8 and 5.0 on x86 in our checks; tests/test_data.py compares them with the installed cv2).
When cv2 can be imported it is used instead: the same pixels, ~40x faster resizing, which matters for loading
ADE20K (a 2x bilinear upscale of a 512x683 image: ~35 ms in NumPy, ~1 ms in OpenCV on one core).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics, for pixels scaled to [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = 255


@functools.lru_cache(maxsize=None)
def _cv2():
    """OpenCV if installed (imported on first use, not at import time), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


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


def resize_image(image: np.ndarray, w: int, h: int, use_cv2: bool = True) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) for uint8 (H, W, C). The NumPy path is bit-exact with opencv-python (checked on
    random images): a horizontal pass in integers, then OpenCV's vectorised vertical pass (pre-shift by 4, 16-bit
    multiply-high, round by 2 bits)."""
    if use_cv2 and _cv2() is not None:
        return _cv2().resize(np.ascontiguousarray(image), (w, h), interpolation=_cv2().INTER_LINEAR)
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


def resize_label(label: np.ndarray, w: int, h: int, use_cv2: bool = True) -> np.ndarray:
    """OpenCV INTER_NEAREST exactly: source index floor(x * (1 / (new / old))), computed in double as OpenCV does."""
    if use_cv2 and _cv2() is not None and label.dtype == np.uint8:
        return _cv2().resize(np.ascontiguousarray(label), (w, h), interpolation=_cv2().INTER_NEAREST)
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


def rgb_to_hsv(image: np.ndarray, use_cv2: bool = True) -> np.ndarray:
    """cv2.cvtColor(RGB2HSV) for uint8: integer tables with 12 fractional bits."""
    if use_cv2 and _cv2() is not None:
        return _cv2().cvtColor(np.ascontiguousarray(image), _cv2().COLOR_RGB2HSV)
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


def hsv_to_rgb(hsv: np.ndarray, use_cv2: bool = True) -> np.ndarray:
    """cv2.cvtColor(HSV2RGB) for uint8 (H, W, 3) as opencv-python's AVX2 build computes it, bit-exact with OpenCV
    4.5/4.8 on all 2^24 inputs: float32 sector formula with 1 - s*f fused (FMA). Each row goes through 32-pixel
    SIMD blocks, which truncate to uint8, and a scalar tail of (W mod 32) pixels, which rounds."""
    if use_cv2 and _cv2() is not None:
        return _cv2().cvtColor(np.ascontiguousarray(hsv), _cv2().COLOR_HSV2RGB)
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
