"""The data options of train.py, eval.py and the pre-flight (`add_data_args`), and the datasets they name:
procedural shapes, the mmseg layouts of layouts.py (ADE20K, VOC, Context, COCO-Stuff, COCO-Object, Cityscapes) or a
user folder (`segmentation_dataset`), procedural boxes or COCO-format files (`detection_dataset`). Which of the two
a run builds is its task's choice (denseclip/run/tasks.py)."""
import argparse
import os
from pathlib import Path
from typing import NamedTuple, Optional

from ..configs import check_class_names
from ..errors import ConfigError, MissingFileError, whole
from . import transforms
from .coco import CocoDetection
from .layouts import LAYOUTS
from .procedural import SHAPE_CLASSES, ProceduralDetection, ProceduralShapes
from .segmentation import FolderSegmentation, LayoutSegmentation, read_class_names


# -------------------------------------------------------------------------------------------- options
MIN_SIDE = 32  # the smallest image side (--crop-size, --scale) the models take: the image encoder's output stride
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: description and epilog as written (they hold examples), and every option's help ending
    with its default, as argparse.ArgumentDefaultsHelpFormatter does, unless the text already says it. An option
    whose default is None must say in its own words what unset means (tests/test_help.py checks every option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        value = action.default
        shown = "off" if value is False else "none" if value == [] else \
            " ".join(map(str, value)) if isinstance(value, list) else str(value)
        return f"{text} (default: {shown})".strip()


def add_data_args(p: argparse.ArgumentParser, evaluation: bool = False, recipe: str = "from the recipe, see below"):
    """The data options; evaluation: eval.py's set (the validation split only: the training-only options are
    accepted but not listed, and --scale / --crop-size say what they do at test time); recipe: where the default
    of a recipe option (--train-size) is told."""
    train_only = argparse.SUPPRESS if evaluation else None
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["procedural", *LAYOUTS, "folder", "coco"], default="procedural",
                   help="procedural: built-in shapes, no files (default); ade20k, voc21, voc21aug, voc20, context60, "
                        "context59, coco_stuff, coco_object, cityscapes: in mmseg's layouts (data/README.md); "
                        "folder: your own images/labels (see --img-dir); coco (detection): COCO 2017 or "
                        f"any COCO-format json + image folder (see --{'val' if evaluation else 'train'}-ann)")
    g.add_argument("--data-root", help="ade20k, voc21, ...: default mmseg's (data/ade/ADEChallengeData2016, "
                                       "data/VOCdevkit/VOC2012, ...; data/README.md); folder: the dataset root; "
                                       "coco: default data/coco")
    g.add_argument("--train-ann", help=train_only or "coco: training annotations (default DATA_ROOT/annotations/"
                                                     "instances_train2017.json); class names come from its categories")
    g.add_argument("--train-images", help=train_only or "coco: training image folder (default DATA_ROOT/train2017)")
    g.add_argument("--val-ann", help="coco: validation annotations (default DATA_ROOT/annotations/"
                                     "instances_val2017.json)")
    g.add_argument("--val-images", help="coco: validation image folder (default DATA_ROOT/val2017)")
    g.add_argument("--img-dir", default="images", help="folder: images under DATA_ROOT/IMG_DIR/SPLIT")
    g.add_argument("--ann-dir", default="annotations", help="folder: labels (same stem) under DATA_ROOT/ANN_DIR/SPLIT")
    g.add_argument("--train-split", default="training", help=train_only or "folder: training split name")
    g.add_argument("--val-split", default="validation", help="folder: validation split name")
    g.add_argument("--img-suffix", default=".jpg", help="folder: the images' file suffix")
    g.add_argument("--seg-suffix", default=".png", help="folder: the label images' file suffix")
    g.add_argument("--reduce-zero-label", action="store_true", help="folder: label 0 is 'other' (ignored), k -> k-1")
    g.add_argument("--class-names", help="folder (needed there): a text file with one class name per line, or "
                                         "'cat,dog,sky' (default: the dataset's own names)")
    g.add_argument("--scale", type=whole(MIN_SIDE), nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="test images are resized (keep ratio) to fit these bounds (default 2048 512)" if evaluation
                   else "resize bound (keep ratio) for training (x U(0.5, 2)) and test images (default 2048 512)")
    g.add_argument("--crop-size", type=whole(MIN_SIDE),
                   help="procedural: the image size (default: the model's input_resolution; detection: min_size); "
                        "file datasets: unused (see --scale)" if evaluation else
                   "training crop (default: the model's input_resolution); procedural: the image size")
    g.add_argument("--train-size", type=whole(1),
                   help=train_only or f"procedural: training images per epoch (default: {recipe})")
    g.add_argument("--val-size", type=whole(0), help="evaluate on the first N validation images only (quick checks; "
                                                "default and 0: all)")
    g.add_argument("--check-data", choices=["quick", "full", "off"], default="quick",
                   help=f"pre-flight before {'evaluating' if evaluation else 'the first step'} (default: %(default)s): "
                        "quick: files paired / listed, "
                        "sizes from headers, validation labels decoded; full: decode every file, in parallel; off")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set head_dropout=0 --set test_mode=slide")


def class_names_arg(value: str) -> list:
    """--class-names: a text file (one name per line) or 'cat,dog,sky'. A value that looks like a path (a folder
    separator or a file extension, no comma) but names no file is a missing file, not a one-class list."""
    path = Path(value)
    if path.is_file():
        return read_class_names(path)
    if "," not in value and ("/" in value or os.sep in value or path.suffix in (".txt", ".names", ".csv", ".json")):
        raise MissingFileError(f"--class-names {value}: no such file (give a text file with one class name per "
                               "line, or the names themselves: 'cat,dog,sky')")
    return check_class_names(value.split(","))


def name_list(text: str) -> list:
    """An argparse type: comma-separated class names ('disc, box'), stripped; none empty, none repeated."""
    try:
        return check_class_names([n.strip() for n in text.split(",")])
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class SplitFiles(NamedTuple):
    """One folder pair of a split of a file dataset, as the pre-flight checks it."""
    img_dir: Path
    ann_dir: Path
    img_suffix: str
    seg_suffix: str
    reduce_zero_label: bool
    split_file: Optional[Path] = None  # the stems to use, one a line; None: every image in img_dir


def split_files(args, split: str) -> list:
    """The folder pairs (SplitFiles) of the train or val split of a file dataset (a layout of layouts.py, or
    folder); None for the procedural one."""
    if args.dataset == "procedural":
        return None
    if args.dataset in LAYOUTS:
        layout = LAYOUTS[args.dataset]
        root = Path(args.data_root or layout.root)
        return [SplitFiles(root / part.img_dir, root / part.ann_dir, layout.img_suffix, layout.seg_suffix,
                           layout.reduce_zero_label, root / part.split_file if part.split_file else None)
                for part in (layout.train if split == "train" else layout.val)]
    if not args.data_root or not args.class_names:
        raise ConfigError("--dataset folder needs --data-root and --class-names")
    root, sub = Path(args.data_root), args.train_split if split == "train" else args.val_split
    return [SplitFiles(root / args.img_dir / sub, root / args.ann_dir / sub, args.img_suffix, args.seg_suffix,
                       args.reduce_zero_label)]


def coco_files(args, split: str):
    """(image folder, annotation json) of the train or val split of --dataset coco: the --train-* / --val-*
    options, or COCO 2017's layout under --data-root (default data/coco)."""
    train, root = split == "train", Path(args.data_root or "data/coco")
    ann = (args.train_ann if train else args.val_ann) or root / "annotations" / f"instances_{split}2017.json"
    return Path((args.train_images if train else args.val_images) or root / f"{split}2017"), Path(ann)


def dataset_class_names(args) -> list:
    if args.dataset == "procedural":
        return list(SHAPE_CLASSES)
    if args.dataset in LAYOUTS:
        return list(LAYOUTS[args.dataset].class_names)
    if not args.class_names:
        raise ConfigError("--dataset folder needs --data-root and --class-names")
    return class_names_arg(args.class_names)


def segmentation_dataset(args, split: str, crop: int):
    """The train or val segmentation dataset named by the data options (split 'train' or 'val'); crop: the training
    crop side (procedural: the image side)."""
    train = split == "train"
    n = None if train else args.val_size or None  # 0 or unset: all
    if args.dataset == "coco":
        raise ConfigError(f"--dataset coco is detection data; {args.model} is a segmentation model")
    if args.dataset == "procedural":
        return ProceduralShapes(split, size=crop, length=args.train_size if train else n, seed=args.seed)
    transform = transforms.TrainTransform(scale=tuple(args.scale), crop_size=(crop, crop)) if train \
        else transforms.TestTransform(scale=tuple(args.scale))
    if args.dataset in LAYOUTS:
        dataset = LayoutSegmentation(args.dataset, args.data_root, split, transform, seed=args.seed)
    else:
        files = split_files(args, split)[0]
        dataset = FolderSegmentation(files.img_dir, files.ann_dir, dataset_class_names(args), transform,
                                     files.img_suffix, files.seg_suffix, files.reduce_zero_label, seed=args.seed)
    dataset.samples = dataset.samples[:n]  # (image, label) paths, sorted; [:None] keeps all
    return dataset


def detection_dataset(args, split: str, size: int, masks: bool):
    """Detection data: procedural shapes with boxes (images `size` pixels square), or COCO-format files; masks:
    give instance masks too (Mask R-CNN's training targets); --val-size keeps the first N validation images
    (COCOeval then scores only those)."""
    train = split == "train"
    n = (args.train_size if train else args.val_size) or None
    if args.dataset == "procedural":
        return ProceduralDetection(split, size=size, length=n, seed=args.seed, masks=masks)
    n = None if train else n
    if args.dataset != "coco":
        raise ConfigError(f"--dataset {args.dataset} is segmentation data; {args.model} is a detector: use "
                          "--dataset coco (COCO or a COCO-format json) or procedural")
    images, ann = coco_files(args, split)
    dataset = CocoDetection(images, ann, train=train, seed=args.seed, masks=masks)
    dataset.ids = dataset.ids[:n]
    return dataset
