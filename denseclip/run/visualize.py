"""Pictures of what a segmentor sees, drawn with PIL only: the prediction blended over the photo with a legend,
and pixel-text score maps as heat maps over the photo with a colour bar (the picture that explains DenseCLIP:
how well each pixel matches each class name, before any decoder).

Layouts (all arrays uint8 RGB, (H, W, 3); the photo keeps its size and sits at the top-left of each panel):
    prediction_picture:  [ blend (H x W) | legend: colour swatch + name per predicted class ]
    score_picture:       title row, then [ photo | heat map of name 1 | ... | colour bar with max / min ]
Heat maps share one value range per picture (written at the ends of the bar), so the names compare directly;
the colour map ("hot": black -> red -> yellow -> white) is monotone in every channel, so brighter = higher score.
Class colours are the fixed palette of visualize.palette() (PASCAL VOC's), the one the label PNGs carry.
"""
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..clip import CLIP_MEAN, CLIP_STD

ALPHA = 0.5  # weight of the class colour in the blend: the photo stays readable under it
HEAT_ALPHA = 0.7  # weight of the heat colour over the photo: the map dominates, the scene stays visible
PAD, SWATCH, ROW = 4, 12, 16  # legend geometry in pixels: margin, swatch side, row pitch (default font ~11 px)
BAR = 12  # colour bar width
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def font():
    return ImageFont.load_default()


def text_width(text: str) -> int:
    box = font().getbbox(text)
    return int(box[2] - box[0])


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor (CLIP mean/std) back to uint8 (H, W, 3), for pictures of dataset samples."""
    x = image.detach().float().cpu() * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


def blend(photo: np.ndarray, pred: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """(1 - ALPHA) * photo + ALPHA * palette[pred], rounded: (H, W, 3) uint8."""
    colours = np.asarray(palette, np.float32).reshape(-1, 3)[pred]  # (H, W, 3)
    return np.round((1 - ALPHA) * photo.astype(np.float32) + ALPHA * colours).astype(np.uint8)


def legend_rows(n: int) -> list:
    """Top-left corners (x, y) of the swatches, relative to the legend panel."""
    return [(PAD, PAD + i * ROW) for i in range(n)]


def prediction_picture(photo: np.ndarray, pred: np.ndarray, class_names: Sequence[str], palette: Sequence[int]):
    """(picture, legend names): the blend with a legend of the classes present (in class order) on its right."""
    H, W = pred.shape
    present = [int(k) for k in np.unique(pred)]
    names = [class_names[k] for k in present]
    panel_w = 2 * PAD + SWATCH + PAD + max([text_width(n) for n in names] + [0])
    canvas = Image.new("RGB", (W + panel_w, max(H, 2 * PAD + ROW * len(names))), WHITE)
    canvas.paste(Image.fromarray(blend(photo, pred, palette)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (x, y), k, name in zip(legend_rows(len(names)), present, names):
        colour = tuple(palette[3 * k: 3 * k + 3])
        draw.rectangle([W + x, y, W + x + SWATCH - 1, y + SWATCH - 1], fill=colour, outline=BLACK)
        draw.text((W + x + SWATCH + PAD, y), name, fill=BLACK, font=font())
    return canvas, names


def heat_colours(t: np.ndarray) -> np.ndarray:
    """The "hot" colour map: t in [0, 1] -> uint8 (..., 3); each channel is non-decreasing in t."""
    t = np.clip(t, 0.0, 1.0)[..., None] * 3.0  # red rises on [0, 1/3], green on [1/3, 2/3], blue on [2/3, 1]
    return np.round(255 * np.clip(t - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)).astype(np.uint8)


def score_picture(photo: np.ndarray, scores: np.ndarray, names: Sequence[str]):
    """(picture, (lo, hi)): photo and one heat map per name over it, side by side, sharing one value range.
    scores: (K, H, W) floats (cosine scores s of the K names), at the photo's size."""
    K, H, W = scores.shape
    lo, hi = float(scores.min()), float(scores.max())
    t = (scores - lo) / max(hi - lo, 1e-12)  # (K, H, W) in [0, 1]
    labels = [f"{hi:.3f}", f"{lo:.3f}"]
    bar_w = 2 * PAD + BAR + max(text_width(s) for s in labels)
    canvas = Image.new("RGB", ((K + 1) * W + bar_w, ROW + H), WHITE)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(photo), (0, ROW))
    draw.text((PAD, 2), "photo", fill=BLACK, font=font())
    for k, name in enumerate(names):
        over = (1 - HEAT_ALPHA) * photo.astype(np.float32) + HEAT_ALPHA * heat_colours(t[k]).astype(np.float32)
        canvas.paste(Image.fromarray(np.round(over).astype(np.uint8)), ((k + 1) * W, ROW))
        draw.text(((k + 1) * W + PAD, 2), name, fill=BLACK, font=font())
    x0 = (K + 1) * W + PAD
    ramp = heat_colours(np.linspace(1.0, 0.0, H))  # (H, 3): the top of the bar is the maximum
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None], BAR, axis=1)), (x0, ROW))
    draw.text((x0 + BAR + PAD, ROW), labels[0], fill=BLACK, font=font())
    draw.text((x0 + BAR + PAD, ROW + H - ROW), labels[1], fill=BLACK, font=font())
    draw.text((x0, 2), "cos", fill=BLACK, font=font())
    return canvas, (lo, hi)


def save_png(image: Image.Image, path, **text):
    """Save as PNG with text chunks (e.g. legend=[...] as JSON) that tools and tests can read back."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, json.dumps(value))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def label_png(pred: np.ndarray, palette: Sequence[int]) -> Image.Image:
    """The raw prediction: a palette PNG whose pixel values are the class indices."""
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(list(palette))
    return im


# ------------------------------------------------------------------------------------------ evaluation
def palette() -> list:
    """PASCAL VOC's colour map (class bits spread over the high bits of R, G, B): 256 fixed, distinct colours;
    index 0 is black and 255 (ignore) a pale grey."""
    pal = []
    for i in range(256):
        r = g = b = 0
        for j in range(8):
            r |= ((i >> (3 * j)) & 1) << (7 - j)
            g |= ((i >> (3 * j + 1)) & 1) << (7 - j)
            b |= ((i >> (3 * j + 2)) & 1) << (7 - j)
        pal += [r, g, b]
    return pal



SHOW_SCORE_THR = 0.3  # --show-dir draws detections above this score (mmdet's show_result default)



def mask_outline(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) binary mask -> (H, W) bool: its pixels with a neighbour (of the 8) outside it or off the image."""
    outside = torch.nn.functional.pad(1 - mask.bool().float()[None, None], (1, 1, 1, 1), value=1)  # (1, 1, H+2, W+2)
    return mask.bool() & (torch.nn.functional.max_pool2d(outside, 3, stride=1)[0, 0] > 0)  # (H, W)



def draw_detections(image: torch.Tensor, det: dict, class_names, score_thr: float = SHOW_SCORE_THR) -> Image.Image:
    """An RGB picture of `det` over `image` (3, H, W) in [0, 1]: per detection above score_thr its box, "name
    score" and, for Mask R-CNN, its mask outline, in the class's palette colour."""
    keep = det["scores"] >= score_thr
    canvas = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pal = palette()
    colours = [tuple(pal[3 * (k + 1): 3 * (k + 2)]) for k in det["labels"][keep].tolist()]  # index 0 is black
    if "masks" in det:
        for mask, colour in zip(det["masks"][keep].cpu(), colours):
            canvas[mask_outline(mask).numpy()] = colour
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for box, score, label, colour in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                         det["labels"][keep].tolist(), colours):
        draw.rectangle(box, outline=colour, width=1)
        draw.text((box[0] + 2, box[1] + 1), f"{class_names[label]} {score:.2f}", fill=colour)
    return picture
