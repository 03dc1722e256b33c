"""The zero-shot options that eval.py and demo.py share (`add_zero_shot_args`) and the model they name
(`zero_shot_model`): raw CLIP weights, the class names with their synonyms, and the settings of the protocol of the
training-free papers (denseclip/zeroshot.py). Their defaults are SCLIP's and NACLIP's for CLIP ViT-B/16: images
resized to a short side of 336 (long side at most 2048: `--scale 2048 336`), 224-pixel windows at stride 112, logit
scale 40, and a background threshold of 0.1 where the classes have a background class (off elsewhere). docs/zero-shot.md
lists each paper's settings per dataset.

A dataset is, to the protocol, images, labels, class names and whether it has a background class (`has_background`:
the dataset's own `background` fact (denseclip/data/layouts.py) when it has one, else whether its first class is
named "background").
"""
import argparse

from ..checkpoint import load_clip
from ..data.options import class_names_arg
from ..errors import ConfigError, number, whole
from ..zeroshot import READOUTS, TEMPLATES, ZeroShotConfig, ZeroShotSegmenter

PROTOCOL_SCALE = [2048, 336]  # --scale under --zero-shot: short side 336 (SCLIP, NACLIP; ClearCLIP 448)
BG_THRESHOLD = 0.1  # SCLIP's and NACLIP's on VOC21, Context60 and COCO-Object (ClearCLIP: 0.5, 0.15, 0.4)


def add_zero_shot_args(p: argparse.ArgumentParser, evaluation: bool):
    """The zero-shot option group of eval.py (evaluation) or demo.py."""
    g = p.add_argument_group(
        "zero-shot (no training: the dataset's classes, --class-names FILE their text: one class a line, synonyms "
        f"comma-separated; --scale defaults to {' '.join(map(str, PROTOCOL_SCALE))})" if evaluation else
        "zero-shot (no training: --classes, or --class-names FILE with one class a line, synonyms comma-separated; "
        f"--scale defaults to {' '.join(map(str, PROTOCOL_SCALE))})")
    g.add_argument("--zero-shot", action="store_true", help="segment by CLIP's own pixel-text scores, no training "
                                                            "(CHECKPOINT is an OpenAI CLIP file; zeroshot.py)")
    g.add_argument("--readout", choices=READOUTS, default="maskclip",
                   help="dense read-out of the image tower: vanilla (plain CLIP), maskclip, sclip, clearclip, naclip "
                        "(ViT; ResNet: vanilla = denseclip, maskclip); see docs/zero-shot.md")
    g.add_argument("--templates", choices=sorted(TEMPLATES), default="imagenet",
                   help="imagenet: OpenAI's 80 prompt templates averaged (the papers'); photo: 'a photo of a {}.'")
    g.add_argument("--window", type=whole(1), help="sliding-window side (default: CLIP's input size, 224 for ViT-B/16)")
    g.add_argument("--stride", type=whole(1), help="sliding-window stride (default: half the window, 112)")
    g.add_argument("--logit-scale", type=number(above=0), default=40.0,
                   help="cosines x this before the softmax over the classes (SCLIP, NACLIP: 40; ClearCLIP: 50)")
    g.add_argument("--bg-threshold", type=number(low=0),
                   help=f"pixels whose best class probability is below this become the background class (default: "
                        f"{BG_THRESHOLD} when the classes have one, the papers' value; else off; 0: off)")
    g.add_argument("--pamr", type=whole(0), default=0, metavar="STEPS",
                   help="refine the logits by PAMR, STEPS iterations at dilations 8 and 16 (NACLIP's published runs: "
                        "10; 0: off)")
    g.add_argument("--area-threshold", type=number(low=0), default=0.0,
                   help="SCLIP's area rule: drop a class predicted on at most this share of an image's non-background "
                        "pixels (SCLIP's VOC21: 0.1; 0: off)")


def has_background(dataset=None, class_names=None) -> bool:
    """Whether the classes have a background class (class 0): the dataset says so, or its first class (first
    synonym) is named 'background'."""
    said = getattr(dataset, "background", None)  # the layouts' fact (segmentation.py)
    if said is not None:
        return bool(said)
    names = class_names if class_names is not None else dataset.class_names
    return str(names[0]).split(",")[0].strip().lower() == "background"


def read_queries(value: str, num_classes: int) -> list:
    """--class-names for the text side of a dataset's classes: a file with one class a line (synonyms
    comma-separated, as the papers' configs/cls_*.txt), or 'a,b,c' (one name each); one entry per class."""
    names = class_names_arg(value)
    if len(names) != num_classes:
        raise ConfigError(f"--class-names {value} names {len(names)} classes; the dataset has {num_classes} (one "
                          "line per class, in the dataset's order; synonyms on the same line, comma-separated)")
    return names


def zero_shot_config(args, clip, class_names, background: bool = None) -> ZeroShotConfig:
    """The protocol's settings the options name, for CLIP `clip` and these classes; background: whether class 0 is
    a background class (None: has_background of the names)."""
    background = has_background(class_names=class_names) if background is None else background
    window = args.window or clip.visual.input_resolution
    threshold = args.bg_threshold if args.bg_threshold is not None else BG_THRESHOLD if background else 0.0
    if threshold > 0 and not background:
        raise ConfigError(f"--bg-threshold {threshold:g}: these classes have no background class (class 0 "
                          f"{class_names[0]!r}); pass --bg-threshold 0, or list 'background' first")
    if threshold > 1:
        raise ConfigError(f"--bg-threshold {threshold:g}: a probability, at most 1")
    return ZeroShotConfig(args.readout, args.templates, args.mode or "slide", window, args.stride or window // 2,
                          args.logit_scale, threshold, args.area_threshold, pamr_steps=args.pamr)


def zero_shot_segmenter(args, class_names, background: bool = None, clip=None) -> ZeroShotSegmenter:
    """The ZeroShotSegmenter the options name, on CLIP weights args.checkpoint (or `clip`, already loaded)."""
    clip = clip or load_clip(args.checkpoint)
    cfg = zero_shot_config(args, clip, class_names, background)
    try:
        return ZeroShotSegmenter(clip, class_names, cfg)
    except ValueError as e:
        raise ConfigError(f"--zero-shot: {e}") from None


def describe(model: ZeroShotSegmenter) -> str:
    """One line: what the protocol runs with."""
    c = model.cfg
    rules = [text for text, on in ((f"PAMR {c.pamr_steps} steps", c.pamr_steps > 0),
                                   (f"area rule {c.area_threshold}", c.area_threshold > 0),
                                   (f"background below p={c.bg_threshold}", c.bg_threshold > 0)) if on]
    return (f"read-out {c.readout}, {len(TEMPLATES[c.templates])} template(s), {model.num_classes} classes "
            f"({len(model.query_class)} text queries), {c.test_mode}"
            f"{f' {c.test_crop}/{c.test_stride}' if c.test_mode == 'slide' else ''}, logit scale {c.logit_scale:g}"
            f"{', ' + ', '.join(rules) if rules else ''}")
