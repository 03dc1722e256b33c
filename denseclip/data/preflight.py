"""Data pre-flight: every problem of a file dataset found before the first training step, and reported together.

train.py and eval.py call `check_data` before building the model; `python -m denseclip.data.preflight` runs the same
checks alone (decoding every file by default):

    python -m denseclip.data.preflight --dataset folder --data-root data/mine --class-names names.txt
    python -m denseclip.data.preflight --dataset coco --data-root data/coco

Segmentation (ade20k, voc21, ... of layouts.py, and folder), quick (the scripts' default): every image has a label and
every label an image (with a split file, VOC's and Context's: every stem it lists has both, other files are other
splits'); image files with another extension than --img-suffix; image and label sizes equal, read from the file headers
(EXIF orientation applied to the image, as the loader does), not by decoding; labels single-channel; enough samples for
one micro-batch; and the validation labels, read at every evaluation, fully decoded with their values checked against
the classes. full: also decode every training image and label (corrupt files, label values outside the classes).
COCO-format detection (coco): every field the loader, the detector and COCOeval read, per json, annotation,
category and image (quick), and every image through the loader itself (full); the list is preflight_coco.py's
docstring.
Files are read by a thread pool (Pillow decodes without the GIL; on network file systems the latency overlaps).
Under torchrun rank 0 checks and every rank raises the same error.

No upstream counterpart: mmseg / mmdet read nothing before the first iteration, so a bad file stops a run when it is
first drawn (or, for validation, at the first evaluation), and an image without a label is silently dropped.
"""
import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch.distributed as dist
from PIL import Image

from ..configs import CONFIGS
from ..errors import DataError, run_main, whole
from ..progress import progress
from . import image_io, segmentation
from .options import HelpFormatter, add_data_args, dataset_class_names, split_files
from .preflight_coco import check_coco
from .image_io import IMAGE_SUFFIXES
from .transforms import IGNORE_INDEX

LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")  # single-channel modes Pillow opens PNGs in
SHOW = 5  # offenders named per kind of problem (the count covers all)


class Findings:
    """Problems by kind, each with its files, in the order found."""

    def __init__(self):
        self.kinds = {}

    def add(self, kind: str, item):
        self.kinds.setdefault(kind, []).append(str(item))

    def __bool__(self):
        return bool(self.kinds)

    def format(self) -> str:
        lines = []
        for kind, items in self.kinds.items():
            lines.append(f"  {len(items)} {kind}:")
            lines += ["    " + x.replace("\n", "\n      ") for x in items[:SHOW]]  # an item's own lines indented
            if len(items) > SHOW:
                lines.append(f"    ... and {len(items) - SHOW} more")
        return "\n".join(lines)


def _header(pair):
    """(kind, message) of the first problem of an (image, label) pair seen from the headers, or None."""
    img, ann = pair
    try:
        with Image.open(img) as im:
            w, h = image_io.oriented_size(im)
    except (OSError, ValueError, SyntaxError) as e:
        return "unreadable image(s)", f"{img}: {e}"
    try:
        with Image.open(ann) as la:
            (lw, lh), mode = la.size, la.mode
    except (OSError, ValueError, SyntaxError) as e:
        return "unreadable label(s)", f"{ann}: {e}"
    if mode not in LABEL_MODES:
        return "label(s) that are not single-channel class maps", f"{ann}: mode {mode} (a colour picture?)"
    if (w, h) != (lw, lh):
        return "image/label size mismatch(es)", f"{img} is {w}x{h} (upright) but {ann} is {lw}x{lh}"
    return None


def label_problem(path, num_classes: int, reduce_zero_label: bool):
    """(kind, message) when a label cannot be decoded or holds values outside the classes (and 255), else None.
    The same rule as image_io.read_label, counted with one bincount over the stored values (ADE20K's 2,000 validation
    labels: a few seconds)."""
    try:
        with Image.open(path) as im:
            stored = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        return "corrupt label(s)", f"{path}: {e}"
    if stored.ndim != 2:
        return "label(s) that are not single-channel class maps", f"{path}: shape {stored.shape}"
    present = np.flatnonzero(np.bincount(stored.ravel(), minlength=256)) if stored.dtype == np.uint8 \
        else np.unique(stored).astype(np.int64)
    if reduce_zero_label:  # 0 -> 255 (ignored), k -> k - 1
        present = np.where((present == 0) | (present == IGNORE_INDEX), IGNORE_INDEX, present - 1)
    bad = present[(present >= num_classes) & (present != IGNORE_INDEX)]
    if bad.size:
        return ("label(s) with values outside the classes",
                f"{path}: values {bad[:10].tolist()} outside 0..{num_classes - 1} and {IGNORE_INDEX} (ignore)"
                f"{' after --reduce-zero-label' if reduce_zero_label else ''}; check the class names and "
                "--reduce-zero-label")
    return None


def _corrupt(img):
    """("corrupt image(s)", message) when the image cannot be decoded as the loader decodes it, else None."""
    try:
        image_io.read_image(img)
    except DataError as e:
        return "corrupt image(s)", f"{img}: {e.__cause__ or e}"
    return None


def _decode(pair, num_classes: int, reduce_zero_label: bool, images: bool):
    """Problems found by decoding the label (and the image): [(kind, message)]."""
    img, ann = pair
    found = [_corrupt(img) if images else None, label_problem(ann, num_classes, reduce_zero_label)]
    return [problem for problem in found if problem]


def listed_split(name: str, files, findings: Findings) -> list:
    """The pairs of the stems a split file lists; a missing split file, or a listed image or label that is not
    there, is a finding."""
    if not files.split_file.is_file():
        findings.add("missing split file(s)", f"{files.split_file} ({name}: the image stems, one a line)")
        return []
    stems = segmentation.read_split_file(files.split_file)
    pairs, no_image, no_label = segmentation.listed_pairs(files.img_dir, files.ann_dir, files.img_suffix,
                                                          files.seg_suffix, stems)
    for path in no_image:
        findings.add(f"{name} image(s) listed in {files.split_file} but missing", path)
    for path in no_label:
        findings.add(f"{name} label(s) of listed images missing (expected <stem>{files.seg_suffix} under "
                     f"{files.ann_dir})", path)
    return pairs


def folder_split(name: str, files, findings: Findings) -> list:
    """The pairs of every image in the folder; images without a label, labels without an image and images of
    another suffix are findings."""
    img_dir, ann_dir, img_suffix, seg_suffix = files[:4]
    pairs, no_label, no_image = segmentation.find_pairs(img_dir, ann_dir, img_suffix, seg_suffix)
    for img in no_label:
        findings.add(f"{name} image(s) without a label (expected <same stem>{seg_suffix} under {ann_dir})", img)
    other = [p for p in img_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and
             not p.name.endswith(img_suffix) and not (img_dir == ann_dir and p.name.endswith(seg_suffix))]
    for p in sorted(other):
        findings.add(f"{name} image(s) with another extension than --img-suffix {img_suffix} (not used)", p)
    for ann in no_image:
        findings.add(f"{name} label(s) without an image (expected <same stem>{img_suffix} under {img_dir})", ann)
    return pairs


def check_split(name: str, files, num_classes: int, decode: str, findings: Findings, pool, limit=None) -> int:
    """Check one folder pair of a split (options.SplitFiles); add what is wrong to `findings`; return its number of
    (image, label) pairs. decode: 'none', 'labels' or 'all'; limit: decode only the first `limit` pairs (those
    evaluated)."""
    for folder, what in ((files.img_dir, "images"), (files.ann_dir, "labels")):
        if not folder.is_dir():
            findings.add("missing folder(s)", f"{folder} ({name} {what}); see data/README.md for the layout")
    if not files.img_dir.is_dir() or not files.ann_dir.is_dir():
        return 0
    pairs = listed_split(name, files, findings) if files.split_file else folder_split(name, files, findings)
    reduce_zero_label = files.reduce_zero_label
    for problem in progress(pool.map(_header, pairs), f"scan {name}", total=len(pairs)):  # a terminal only
        if problem:
            findings.add(*problem)
    if decode != "none":
        work = pairs[:limit]
        decoded = pool.map(lambda p: _decode(p, num_classes, reduce_zero_label, decode == "all"), work)
        for found in progress(decoded, f"decode {name}", total=len(work)):
            for problem in found:
                findings.add(*problem)
    return len(pairs)


def check_segmentation(args, min_train: int, splits, findings: Findings, pool) -> str:
    """Check segmentation files (see the module docstring); return the summary's counts."""
    names, counts = dataset_class_names(args), {}
    for split in splits:
        decode = "all" if args.check_data == "full" else "labels" if split == "val" else "none"
        limit = (args.val_size or None) if split == "val" else None
        counts[split] = sum(check_split(split, files, len(names), decode, findings, pool, limit)
                            for files in split_files(args, split))
    if "train" in counts and counts["train"] and counts["train"] < min_train:
        findings.add("too few training samples", f"{counts['train']} pairs make no micro-batch of {min_train} "
                     "(--batch-size x processes); lower --batch-size or add data")
    if "val" in counts and counts["val"] == 0 and not findings:
        findings.add("empty validation split", f"no images in {split_files(args, 'val')[0].img_dir}")
    what = "every file decoded" if args.check_data == "full" else "sizes from headers, validation labels decoded"
    return ", ".join(f"{n} {s} pairs" for s, n in counts.items()) + f" OK ({what})"


# ---------------------------------------------------------------------------------------------- driver
OPTIONS = {check_coco: "--data-root, --train-ann, --train-images, --val-ann, --val-images",
           check_segmentation: "--data-root, --img-suffix, --seg-suffix, --reduce-zero-label, --class-names"}


def _run(args, min_train: int, splits, check) -> str:
    t0 = time.time()
    if args.dataset == "procedural":
        return "data pre-flight: built-in procedural data, nothing to check"
    if check is None:  # the standalone command: the checks of the data named
        check = check_coco if args.dataset == "coco" else check_segmentation
    elif (check is check_coco) != (args.dataset == "coco"):
        return f"data pre-flight: skipped, {args.dataset} data does not suit {args.model}"  # the dataset says why
    findings = Findings()
    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        summary = check(args, min_train, splits, findings, pool)
    if findings:
        raise DataError(f"data pre-flight ({args.check_data}) found problems; fix the files or the data options "
                        f"({OPTIONS[check]}; see data/README.md), nothing was trained:\n{findings.format()}")
    return f"data pre-flight ({args.check_data}): {summary} in {time.time() - t0:.1f} s"


def check_data(args, min_train: int = 1, splits=("train", "val"), check=None) -> str:
    """Check the data options' dataset (see the module docstring); raise DataError listing every problem, or return
    a one-line summary. min_train: samples one micro-batch needs (batch size x processes); check: the checks of the
    model's task (check_segmentation or check_coco; data of the other kind is left to the dataset, which refuses
    it), None: those of the data named (the standalone command)."""
    if args.check_data == "off":
        return "data pre-flight: off (--check-data off)"
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _run(args, min_train, splits, check)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, _run(args, min_train, splits, check))
        except (DataError, FileNotFoundError, ValueError) as e:
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, result = box[0]
    if not ok:
        raise result
    return result


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Check a dataset before training: segmentation (every file paired, "
                                            "readable, of matching size, with label values inside the classes) or "
                                            "COCO-format detection (the jsons consistent, every image listed there, "
                                            "readable, of the size the json says).")
    add_data_args(p, recipe="train.py's recipe, see python train.py --help")
    p.add_argument("--batch-size", type=whole(1), default=1, help="images per micro-batch (x processes) to expect")
    p.add_argument("--model", choices=sorted(CONFIGS), metavar="NAME",
                   help="coco: the detector the data is for (its class_token_length, min_size / max_size, Mask "
                        "R-CNN's masks; with --set); default: a DenseCLIP RetinaNet's defaults")
    p.set_defaults(check_data="full")
    args = p.parse_args(argv)
    args.seed = 0
    summary = check_data(args, args.batch_size)
    print(summary)
    return summary


if __name__ == "__main__":
    run_main(main)
