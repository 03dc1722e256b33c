"""Segmentation inference, written once for every segmentor (the DenseCLIP segmentor and the zero-shot read-out):
whole-image or sliding-window logits, averaged over scales and horizontal flips (mmseg's `slide_inference` and
aug test). Each function takes `forward`, what maps a normalised batch (B, 3, h, w) to logits (B, K, h, w).
Shape letters: B batch, K classes, H W image size.
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .precision import at_least_fp32


def resize(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_inference(forward: Callable, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over overlapping crop x crop windows (mmseg's slide mode). All windows have the
    same size (min(crop, H) x min(crop, W)), so they run as one batch."""
    B, _, H, W = images.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n*B, 3, h, w)
    logits = at_least_fp32(forward(crops)).split(B)  # n x (B, K, h, w)
    out = logits[0].new_zeros((B, logits[0].shape[1], H, W))
    count = logits[0].new_zeros((1, 1, H, W))
    for (y1, y2, x1, x2), lg in zip(boxes, logits):
        out[:, :, y1:y2, x1:x2] += lg
        count[:, :, y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict(forward: Callable, images: torch.Tensor, mode: str, crop: int, stride: int, out_size=None,
            ratios: Sequence[float] = (1.0,), flip: bool = False, refine: Optional[Callable] = None) -> torch.Tensor:
    """Class probabilities (B, K, *out_size): softmax averaged over scale ratios and horizontal flips (mmseg's aug
    test). Scales resize the given (already test-resized) batch by each ratio; mode "whole" runs `forward` on the
    whole image, "slide" on crop x crop windows `stride` apart. refine(images, logits), both at out_size, may
    change the logits before the softmax (zero-shot PAMR)."""
    if mode not in ("slide", "whole"):
        raise ConfigError(f"test mode {mode!r}: expected 'slide' or 'whole'")
    out_size = tuple(out_size or images.shape[-2:])
    probs = 0.0
    for r in ratios:
        x = images if r == 1 else F.interpolate(images, scale_factor=r, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = slide_inference(forward, xi, crop, stride) if mode == "slide" else at_least_fp32(forward(xi))
            logits = resize(logits, out_size)
            if refine is not None:
                logits = refine(resize(xi, out_size).to(logits.dtype), logits)
            p = logits.softmax(dim=1)
            probs = probs + (p.flip(-1) if flipped else p)
    return probs / (len(ratios) * (2 if flip else 1))
