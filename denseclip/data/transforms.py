"""mmseg 0.x's segmentation transforms, the official DenseCLIP pipeline, on uint8 RGB image tensors.

TrainTransform: Resize with ``ratio_range`` -> RandomCrop with ``cat_max_ratio`` -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad, with mmseg's draw order and the quirk that after ten rejected crops
the eleventh is taken unchecked. TestTransform: keep-ratio resize of the image, Normalize. Every random draw comes
from the generator passed in (the datasets give one per (seed, epoch, index)), never from global state.
Images arrive as uint8 (H, W, 3) NumPy arrays (PIL's decoding) and are processed as uint8 (3, H, W) tensors with
torch / torchvision ops; labels stay NumPy until the end. Differences from mmseg/mmcv:
- no OpenCV: bilinear resizing is torchvision's uint8 kernel (same half-pixel sampling as cv2.INTER_LINEAR, no
  antialiasing, pixels within +-1 of OpenCV's fixed-point result); nearest label resizing uses OpenCV's rule
  (source index floor(x * old / new)) exactly; the 8-bit HSV round trips of the photometric distortion keep
  OpenCV's integer HSV (H in [0, 180), S and V in [0, 255]) exactly and its HSV -> RGB within +-1;
- the global ``np.random`` state is replaced by the per-sample generator (same distributions, different streams);
- images are RGB throughout (mmseg loads BGR and swaps in Normalize): no operation mixes channels differently;
- Normalize divides by 255 first, then applies CLIP's mean/std (mmseg: mean/std scaled by 255): float rounding only.
tests/test_data.py compares every op with OpenCV (in the dev extra) and runs the pipeline with cv2 hidden.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..clip import CLIP_MEAN, CLIP_STD

IGNORE_INDEX = 255


def to_tensor(image: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 (H, W, 3) array -> contiguous uint8 (3, H, W) tensor; tensors pass through. Contiguous planes matter:
    element-wise ops on a permuted (H, W, 3) view run strided and are many times slower."""
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(image).permute(2, 0, 1).contiguous()


def normalize(image: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 RGB, (H, W, 3) array or (3, H, W) tensor -> float32 (3, H, W) with CLIP's mean/std."""
    x = to_tensor(image).float().div_(255.0)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return x.sub_(mean).div_(std).contiguous()  # (3, H, W)


# ----------------------------------------------------------------------------------------------- geometric ops

def rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv.rescale_size: the largest keep-ratio size fitting long edge <= max(scale), short edge <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def resize_image(image: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Bilinear resize of a uint8 (3, H, W) tensor to (3, h, w), as mmcv.imresize (cv2.INTER_LINEAR): half-pixel
    centres, no antialiasing when shrinking."""
    out = TF.resize(image, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return out.contiguous()  # torchvision's uint8 kernel may hand back (H, W, 3)-strided planes


def resize_label(label: np.ndarray, w: int, h: int) -> np.ndarray:
    """Nearest-neighbour resize as OpenCV's INTER_NEAREST: source index floor(x * (1 / (new / old))) in double."""
    def index(old, new):
        return np.minimum(np.floor(np.arange(new) * (1.0 / (new / old))).astype(np.int64), old - 1)
    return label.take(index(label.shape[0], h), 0).take(index(label.shape[1], w), 1)  # rows, then columns


# -------------------------------------------------------------------------------------------------- 8-bit HSV
# mmseg's saturation and hue steps go RGB -> HSV -> RGB through OpenCV's 8-bit HSV: H in [0, 180) (degrees / 2,
# to fit a byte), S and V in [0, 255]. The quantisation is part of the augmentation, so it is kept: RGB -> HSV
# with OpenCV's integer tables (12 fractional bits, exact), HSV -> RGB with the float formula, rounded.
_HSV_SHIFT = 12
_RGB_OFFSETS = torch.tensor([5.0, 3.0, 1.0])[:, None, None]  # where R, G, B sit on the hue circle (in sixths)


@functools.lru_cache(maxsize=None)
def _hsv_tables() -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's RGB -> HSV arithmetic as two uint8 lookup tables, built on first use: S[v * 256 + diff] and
    H[(h + 255) * 256 + diff] for diff = max - min and h = hue x diff / 60 degrees, in [-255, 1275]."""
    half = 1 << (_HSV_SHIFT - 1)
    k = torch.arange(256, dtype=torch.float64)
    sdiv = torch.cat([torch.zeros(1), torch.round((255 << _HSV_SHIFT) / k[1:])]).long()  # round(255 * 2^12 / v)
    hdiv = torch.cat([torch.zeros(1), torch.round((180 << _HSV_SHIFT) / (6.0 * k[1:]))]).long()  # 30 * 2^12 / diff
    diff = torch.arange(256)
    s = (diff[None, :] * sdiv[:, None] + half) >> _HSV_SHIFT  # (v, diff)
    h = (torch.arange(-255, 1276)[:, None] * hdiv[None, :] + half) >> _HSV_SHIFT  # (h + 255, diff)
    h = torch.where(h < 0, h + 180, h)
    return s.flatten().to(torch.uint8), h.flatten().to(torch.uint8)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> uint8 (3, H, W) HSV, OpenCV's COLOR_RGB2HSV exactly (its fixed-point arithmetic,
    through lookup tables)."""
    s_table, h_table = _hsv_tables()
    x = image.int()
    r, g, b = x
    v = x.amax(0)  # (H, W)
    diff = v - x.amin(0)
    # hue x diff / 60 degrees: g - b when R is the maximum, b - r + 2 diff when G is, r - g + 4 diff when B is
    h = torch.where(v == g, b - r + 2 * diff, (r - g).add_(diff, alpha=4))
    h = torch.where(v == r, g - b, h).add_(255).mul_(256).add_(diff)
    s = v * 256 + diff
    out = torch.empty_like(image)  # (3, H, W)
    torch.index_select(h_table, 0, h.flatten(), out=out[0].view(-1))
    torch.index_select(s_table, 0, s.flatten(), out=out[1].view(-1))
    out[2] = v
    return out


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) HSV -> uint8 (3, H, W) RGB, OpenCV's COLOR_HSV2RGB within +-1 (its SIMD blocks truncate
    where this rounds). Channel c = v (1 - s clamp(min(k, 4 - k), 0, 1)), k = (offset_c + hue in sixths) mod 6."""
    h = hsv[0].float().mul_(6.0 / 180.0)  # hue in sixths of the circle, [0, 6)
    vs = hsv[1].float().mul_(1.0 / 255.0).mul_(hsv[2])  # v * s, with s in [0, 1] and v in [0, 255]
    k = _RGB_OFFSETS + h  # (3, H, W), in [1, 11)
    k -= (k >= 6) * 6.0  # mod 6 (torch.remainder is several times slower)
    k = torch.minimum(k, 4 - k).clamp_(0, 1).mul_(vs)
    return torch.sub(hsv[2], k).round_().clamp_(0, 255).to(torch.uint8)  # (3, H, W)


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
    """mmseg 0.x PhotoMetricDistortion on uint8 (3, H, W): brightness, contrast (first or last), saturation, hue,
    each applied with probability 1/2, with mmseg's draws in mmseg's order."""
    def maybe(draw):  # a step happens with probability 1/2; its parameter is drawn only then
        return draw() if rng.integers(2) else None

    brightness = maybe(lambda: rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)  # mmseg's code does contrast first when mode == 1 (its comment says the opposite)
    contrast_first = maybe(lambda: rng.uniform(*contrast_range)) if mode == 1 else None
    saturation = maybe(lambda: rng.uniform(*saturation_range))
    hue = maybe(lambda: int(rng.integers(-hue_delta, hue_delta)))  # a shift in [-18, 17]
    contrast_last = maybe(lambda: rng.uniform(*contrast_range)) if mode == 0 else None

    def convert(x, alpha=1.0, beta=0.0):  # float32 x * alpha + beta, clip, then truncate to uint8 as mmseg does
        return x.float().mul_(alpha).add_(beta).clamp_(0, 255).to(torch.uint8)

    def apply(x):
        if brightness is not None:
            x = convert(x, beta=brightness)
        if contrast_first is not None:
            x = convert(x, alpha=contrast_first)
        if saturation is not None:
            hsv = rgb_to_hsv(x)
            hsv[1] = convert(hsv[1], alpha=saturation)
            x = hsv_to_rgb(hsv)
        if hue is not None:
            hsv = rgb_to_hsv(x)
            hsv[0] = (hsv[0].int() + hue) % 180
            x = hsv_to_rgb(hsv)
        if contrast_last is not None:
            x = convert(x, alpha=contrast_last)
        return x

    # Every step is per pixel, so it runs on bands of 64 rows: their temporaries stay small enough to be reused
    # and cached, instead of fresh multi-megabyte buffers (page faults took most of the time).
    return torch.cat([apply(band) for band in img.split(64, dim=1)], dim=1)


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
        """uint8 (H, W, 3) RGB image, (H, W) label -> float32 (3, ch, cw) normalised image, int64 (ch, cw) label."""
        scale = self.scale
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        w, h = rescale_size(image.shape[1], image.shape[0], scale)
        img, label = resize_image(to_tensor(image), w, h), resize_label(label, w, h)  # (3, h, w), (h, w)
        y, x = self.crop_box(label, rng)
        ch, cw = self.crop_size
        img, label = img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if rng.random() < self.flip_prob:
            img, label = img.flip(-1), label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        # Pad comes after Normalize in mmseg, so padded image pixels are 0 in normalised space (the mean colour).
        img = normalize(img)
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
        return normalize(resize_image(to_tensor(image), w, h)), torch.from_numpy(label.astype(np.int64))


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], Tuple[torch.Tensor, torch.Tensor]]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one source of randomness for sample `index` of `epoch`: independent of process, worker and history."""
    return np.random.default_rng([seed, epoch, index])
