"""Pictures of what a model sees, drawn with PIL only. One explained picture for demo.py, eval.py --show-dir and the
web demo (the segmentation blended over the photo, or a detector's boxes over it, with a title and a legend), and
pixel-text score maps as heat maps over the photo with a colour bar (the picture that explains DenseCLIP: how well
each pixel matches each class name, before any decoder).

Layouts (uint8 RGB; H x W is the photo's size, f the display factor):
    segmentation_picture / detection_picture:
        title: model | checkpoint | image (one line, or one line per field when that is too wide)
        [ view (H f x W f): photo + prediction | legend: colour swatch, name, share of pixels (detection: boxes) ]
    score_picture:  title row, then [ photo | heat map of name 1 | ... | colour bar with max / min ]
Small photos are enlarged by a whole factor f for display (labels nearest, so a label cell stays one class; the
photo bilinear); the view's place and factor go into the PNG with the legend (save_png), so tools read them back.
Heat maps share one value range per picture (written at the ends of the bar), so the names compare directly; the
colour map ("hot": black -> red -> yellow -> white) is monotone in every channel, so brighter = higher score.

Class colours (class_colours): a fixed table for the first classes, then as many more as there are names (open
vocabulary: any number), each the candidate farthest in CIELAB from all colours before it. None is black or near
white, and class k's colour does not depend on how many classes there are. The label PNGs (label_png: pixel value =
class index) carry the same colours as their palette.
"""
import functools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..clip import CLIP_MEAN, CLIP_STD

ALPHA = 0.6  # weight of the class colour in the blend: the class reads first, the photo stays visible under it
MASK_ALPHA = 0.35  # weight of an instance mask's colour: lighter than a segmentation, boxes and outlines on top
HEAT_ALPHA = 0.7  # weight of the heat colour over the photo: the map dominates, the scene stays visible
PAD, SWATCH, ROW = 4, 12, 16  # score-picture geometry in pixels: margin, swatch side, row pitch (default font ~11 px)
BAR = 12  # colour bar width
LEGEND_COLUMNS = 4  # a legend of many classes grows downwards past this many columns
DISPLAY = 384  # a photo whose long side is shorter is enlarged (by a whole factor) to at least this for display
WHITE, BLACK, GREY, NOTE = (255, 255, 255), (0, 0, 0), (90, 90, 90), (170, 20, 20)
SHOW_SCORE_THR = 0.3  # detection pictures draw detections above this score (mmdet's show_result default)
# The first colours: matplotlib's "tab10" without its grey (grey reads as "nothing"); distinct on photos and white.
FIXED = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (188, 189, 34), (23, 190, 207))
LIGHTNESS = (35.0, 88.0)  # CIELAB L* range of the grown colours: not black, not lost on the white legend
IGNORE_COLOUR = (224, 224, 192)  # a label PNG's index 255 (ignore), as in PASCAL VOC's palette


# ------------------------------------------------------------------------------------------ colours
def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> CIELAB (D65 white): Euclidean distance there approximates perceived difference."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)  # linear light
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883])  # relative to the white point
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


@functools.lru_cache(maxsize=16)
def class_colours(n: int) -> tuple:
    """n RGB tuples: FIXED, then greedily the candidate (an 18-level RGB grid within LIGHTNESS) farthest from every
    colour chosen so far, so each new class is as distinct as the cube allows. Past the ~2900 candidates, colours
    repeat."""
    if n <= len(FIXED):
        return FIXED[:n]
    levels = np.linspace(0, 255, 18).round()
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)  # (5832, 3)
    lab = srgb_to_lab(grid)
    keep = (lab[:, 0] >= LIGHTNESS[0]) & (lab[:, 0] <= LIGHTNESS[1])
    grid, lab = grid[keep], lab[keep]  # (C, 3)
    fixed = srgb_to_lab(np.array(FIXED))  # (F, 3)
    nearest = np.linalg.norm(lab[:, None] - fixed[None], axis=-1).min(1)  # (C,) distance to the closest chosen
    chosen = list(FIXED)
    while len(chosen) < n:
        i = int(nearest.argmax())
        chosen.append(tuple(int(v) for v in grid[i]))
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=1))
    return tuple(chosen)


def label_png(pred: np.ndarray, num_classes: int) -> Image.Image:
    """The raw prediction: a palette PNG whose pixel values are the class indices, in the pictures' colours (over
    255 classes, which a palette cannot hold: a 16-bit grey PNG of the indices)."""
    if num_classes > 255:
        return Image.fromarray(pred.astype(np.uint16))
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    colours = list(class_colours(num_classes)) + [BLACK] * (255 - num_classes) + [IGNORE_COLOUR]
    im.putpalette([v for c in colours for v in c])
    return im


# ------------------------------------------------------------------------------------------ drawing pieces
@functools.lru_cache(maxsize=8)
def font(size: Optional[int] = None):
    """PIL's default font: the scalable one at `size` (Pillow >= 10.1), else the fixed bitmap font."""
    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size)
    except TypeError:  # older Pillow: load_default takes no size
        return ImageFont.load_default()


def text_width(text: str, size: Optional[int] = None) -> int:
    box = font(size).getbbox(text)
    return int(box[2] - box[0])


def text_size(width: int) -> int:
    """Font size of an explained picture's title and legend: readable on small views, in proportion on large."""
    return max(14, width // 48)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor (CLIP mean/std) back to uint8 (H, W, 3), for pictures of dataset samples."""
    x = image.detach().float().cpu() * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


def display_factor(H: int, W: int) -> int:
    """The whole factor that brings the long side to at least DISPLAY (1 for photos that are large enough)."""
    return max(1, math.ceil(DISPLAY / max(H, W)))


def enlarge(photo: np.ndarray, f: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H f, W f, 3), bilinear: the photo as displayed."""
    if f == 1:
        return photo
    H, W = photo.shape[:2]
    return np.asarray(Image.fromarray(photo).resize((W * f, H * f), Image.BILINEAR))


def enlarge_labels(labels: np.ndarray, f: int) -> np.ndarray:
    """(..., H, W) -> (..., H f, W f), nearest: every label cell becomes an f x f block of the same class."""
    return labels.repeat(f, axis=-2).repeat(f, axis=-1)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels whose right or lower neighbour has another label (a 1-pixel line between regions)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def blend(photo: np.ndarray, pred: np.ndarray, colours: Sequence, alpha: float = ALPHA) -> np.ndarray:
    """(1 - alpha) * photo + alpha * colours[pred], rounded: (H, W, 3) uint8. colours: (K, 3) RGB."""
    c = np.asarray(colours, np.float32).reshape(-1, 3)[pred]  # (H, W, 3)
    return np.round((1 - alpha) * photo.astype(np.float32) + alpha * c).astype(np.uint8)


def ink_for(colour) -> tuple:
    """Black or white text, whichever reads on `colour` (by its CIELAB lightness)."""
    return BLACK if srgb_to_lab(np.array(colour))[0] > 60 else WHITE


def fit(text: str, width: int, size: int) -> str:
    """`text`, cut from the left ("...tail") until it is at most `width` pixels wide: paths keep their file name."""
    while text_width(text, size) > width and len(text) > 4:
        text = "..." + text[4:]
    return text


def title_lines(fields: Sequence[str], width: int, size: int) -> list:
    """The title fields on one line when they fit in `width` pixels, else one line each (cut to fit)."""
    one = " | ".join(fields)
    return [one] if text_width(one, size) <= width else [fit(f, width, size) for f in fields]


def legend_panel(entries: Sequence, size: int, height: int) -> Image.Image:
    """entries: (colour or None, name, detail); a white panel with a swatch, name and detail per entry (no swatch
    and in NOTE's colour where colour is None), in columns of the view's `height`, at most LEGEND_COLUMNS of them
    (longer when that is not enough)."""
    pad, row = size // 2, size + size // 2
    per_col = max(1, (height - pad) // row, math.ceil(len(entries) / LEGEND_COLUMNS))
    cols = [entries[i:i + per_col] for i in range(0, len(entries), per_col)] or [[]]
    name_w = [max([text_width(n, size) for _, n, _ in col] + [0]) for col in cols]
    detail_w = [max([text_width(d, size) for _, _, d in col] + [0]) for col in cols]
    col_w = [pad + size + pad + n + 2 * pad + d + pad for n, d in zip(name_w, detail_w)]
    panel = Image.new("RGB", (sum(col_w) + pad, pad + row * min(per_col, max(len(entries), 1))), WHITE)
    draw = ImageDraw.Draw(panel)
    x0 = pad
    for col, w, nw in zip(cols, col_w, name_w):
        for i, (colour, name, detail) in enumerate(col):
            y = pad + i * row
            if colour is None:
                draw.text((x0, y), name, fill=NOTE, font=font(size))
                continue
            draw.rectangle([x0, y, x0 + size - 1, y + size - 1], fill=tuple(colour), outline=BLACK)
            draw.text((x0 + size + pad, y), name, fill=BLACK, font=font(size))
            draw.text((x0 + size + pad + nw + 2 * pad, y), detail, fill=GREY, font=font(size))
        x0 += w
    return panel


def compose(view: Image.Image, entries: Sequence, title: Sequence[str], factor: int):
    """(picture, layout): the title above, the view and its legend panel side by side below; layout: where the view
    sits ([x, y, factor]) and the title lines, for save_png."""
    size = text_size(view.width)
    pad, row = size // 2, size + size // 2
    panel = legend_panel(entries, size, view.height)
    width = view.width + panel.width
    lines = title_lines(title, width - 2 * pad, size) if title else []
    top = pad + row * len(lines)
    canvas = Image.new("RGB", (width, top + max(view.height, panel.height)), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * row), line, fill=BLACK, font=font(size))
    canvas.paste(view, (0, top))
    canvas.paste(panel, (view.width, top))
    return canvas, {"view": [0, top, factor], "title": lines}


def share_text(share: float) -> str:
    return "<0.1%" if share < 0.0005 else f"{100 * share:.1f}%"


# ------------------------------------------------------------------------------------------ explained pictures
def segmentation_picture(photo: np.ndarray, pred: np.ndarray, class_names: Sequence[str], title=()):
    """(picture, info): the prediction (H, W) blended over the photo (H, W, 3), with a title and a legend of the
    classes present, largest share first. info (what save_png stores): legend [{name, colour, share}], view, title."""
    H, W = pred.shape
    colours = class_colours(len(class_names))
    present, counts = np.unique(pred, return_counts=True)
    legend = [{"name": class_names[k], "colour": list(colours[k]), "share": int(c) / pred.size}
              for k, c in sorted(zip(present.tolist(), counts.tolist()), key=lambda kc: -kc[1])]
    f = display_factor(H, W)
    big = enlarge_labels(pred, f)  # (H f, W f)
    view = blend(enlarge(photo, f), big, colours)
    view[boundaries(big)] = WHITE  # where the classes meet: the regions read apart from the photo's own edges
    view = Image.fromarray(view)
    picture, layout = compose(view, [(e["colour"], e["name"], share_text(e["share"])) for e in legend], title, f)
    return picture, {"legend": legend, **layout}


def mask_outline(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(H, W) binary mask -> (H, W) bool: its pixels within `width` of a pixel outside it or off the image."""
    outside = torch.nn.functional.pad(1 - mask.bool().float()[None, None], (width,) * 4, value=1)  # (1, 1, H+2w, W+2w)
    return mask.bool() & (torch.nn.functional.max_pool2d(outside, 2 * width + 1, stride=1)[0, 0] > 0)  # (H, W)


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_detections(photo: np.ndarray, det: dict, colours: Sequence, class_names, f: int, keep) -> Image.Image:
    """The view: per kept detection its mask (Mask R-CNN: lightly filled, outlined), box and "name score" caption
    in its class colour, over the photo enlarged f times; the best detections are drawn last (on top), and a
    caption that would cover an earlier one moves down below it."""
    canvas = enlarge(photo, f).copy()
    line = max(2, f)  # box and outline width at display size
    order = torch.argsort(det["scores"][keep].cpu(), stable=True).tolist()  # ascending score
    labels, scores = det["labels"][keep].cpu()[order].tolist(), det["scores"][keep].cpu()[order].tolist()
    for mask, k in zip(det["masks"][keep].cpu()[order] if "masks" in det else [], labels):
        big = torch.from_numpy(enlarge_labels(mask.numpy().astype(bool), f))  # (H f, W f)
        canvas[big.numpy()] = blend(canvas[big.numpy()], np.zeros(int(big.sum()), np.int64), [colours[k]], MASK_ALPHA)
        canvas[mask_outline(big, line // 2).numpy()] = colours[k]
    view = Image.fromarray(canvas)
    draw, size = ImageDraw.Draw(view), max(12, text_size(view.width) * 3 // 4)
    captions = []
    for box, score, k in zip((det["boxes"][keep].cpu()[order] * f).tolist(), scores, labels):
        draw.rectangle(box, outline=colours[k], width=line)
        caption = f"{class_names[k]} {score:.2f}"
        y = box[1] - size - 2 if box[1] >= size + 2 else box[1]  # above the box, inside it at the top edge
        rect = [box[0], y, box[0] + text_width(caption, size) + 4, y + size + 2]
        while any(overlaps(rect, r) for r in captions):
            rect[1], rect[3] = rect[1] + size + 2, rect[3] + size + 2
        captions.append(rect)
        draw.rectangle(rect, fill=colours[k])
        draw.text((rect[0] + 2, rect[1]), caption, fill=ink_for(colours[k]), font=font(size))
    return view


def detection_picture(image, det: dict, class_names: Sequence[str], title=(), score_thr: float = SHOW_SCORE_THR):
    """(picture, info): the detections above score_thr over the image ((3, H, W) in [0, 1], or uint8 (H, W, 3)),
    with a title and a legend of the classes drawn (boxes, best score), most boxes first; a note instead when no
    detection reaches score_thr. info: legend [{name, colour, boxes, best}], note, view, title."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    keep = det["scores"] >= score_thr
    colours = class_colours(len(class_names))
    f = display_factor(*image.shape[:2])
    view = draw_detections(image, det, colours, class_names, f, keep)
    found = {}
    for k, score in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist()):
        found.setdefault(k, []).append(score)
    legend = [{"name": class_names[k], "colour": list(colours[k]), "boxes": len(s), "best": max(s)}
              for k, s in sorted(found.items(), key=lambda ks: (-len(ks[1]), -max(ks[1])))]
    entries = [(e["colour"], e["name"], f"{e['boxes']} box{'es' if e['boxes'] > 1 else ''}, best {e['best']:.2f}")
               for e in legend]
    note = None if legend else f"no detection with score >= {score_thr:.2f}"
    picture, layout = compose(view, entries or [(None, note, "")], title, f)
    return picture, {"legend": legend, "note": note, **layout}


# ------------------------------------------------------------------------------------------ score maps
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
