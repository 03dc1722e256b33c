"""What train.py and eval.py share: the data options and dataset construction, mixed precision, the
resumable distributed batch stream, training checkpoints (atomic writes, every RNG state) and evaluation.
Both tasks go through the same functions: segmentation batches are `(images (B, 3, H, W), labels (B, H, W))`,
detection batches `(list of (3, H, W) images, list of target dicts)` (see coco.py); `train_batches` and
`evaluate` choose by the dataset's / model's `task`.

Kept in the package (as torchvision's references keep theirs in utils.py) so that neither script imports the
other and each reads as one plain loop.
"""
import argparse
import ast
import contextlib
import os
import pickle
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from . import coco, data, transforms
from .checkpoint import is_torchscript, load_file
from .configs import DenseCLIPConfig, task_of
from .errors import ConfigError, MissingFileError, TrainingError
from .metrics import ConfusionMatrix
from .progress import progress

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test (with horizontal flip)


def autocast(device: torch.device, amp: str):
    """torch.autocast for --amp {bf16, fp16}; a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# -------------------------------------------------------------------------------------------- options
def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["procedural", "ade20k", "folder", "coco"], default="procedural",
                   help="procedural: built-in shapes, no files (default); ade20k: ADEChallengeData2016 in mmseg's "
                        "layout; folder: your own images/labels (see --img-dir); coco (detection): COCO 2017 or "
                        "any COCO-format json + image folder (see --train-ann)")
    g.add_argument("--data-root", help="ade20k: default data/ade/ADEChallengeData2016; folder: the dataset root; "
                                       "coco: default data/coco")
    g.add_argument("--train-ann", help="coco: training annotations (default DATA_ROOT/annotations/"
                                       "instances_train2017.json); class names come from its categories")
    g.add_argument("--train-images", help="coco: training image folder (default DATA_ROOT/train2017)")
    g.add_argument("--val-ann", help="coco: validation annotations (default DATA_ROOT/annotations/"
                                     "instances_val2017.json)")
    g.add_argument("--val-images", help="coco: validation image folder (default DATA_ROOT/val2017)")
    g.add_argument("--img-dir", default="images", help="folder: images under DATA_ROOT/IMG_DIR/SPLIT")
    g.add_argument("--ann-dir", default="annotations", help="folder: labels (same stem) under DATA_ROOT/ANN_DIR/SPLIT")
    g.add_argument("--train-split", default="training", help="folder: training split name (default: training)")
    g.add_argument("--val-split", default="validation", help="folder: validation split name (default: validation)")
    g.add_argument("--img-suffix", default=".jpg")
    g.add_argument("--seg-suffix", default=".png")
    g.add_argument("--reduce-zero-label", action="store_true", help="folder: label 0 is 'other' (ignored), k -> k-1")
    g.add_argument("--class-names", help="folder: a text file with one class name per line, or 'cat,dog,sky'")
    g.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="resize bound (keep ratio) for training (x U(0.5, 2)) and test images (default 2048 512)")
    g.add_argument("--crop-size", type=int,
                   help="training crop (default: the model's input_resolution); procedural: the image size")
    g.add_argument("--train-size", type=int, help="procedural: training images per epoch (default: segmentation 20000, "
                                                  "detection 2000)")
    g.add_argument("--val-size", type=int, help="evaluate on the first N validation images only (quick checks; 0: all)")
    g.add_argument("--check-data", choices=["quick", "full", "off"], default="quick",
                   help="pre-flight before the first step: quick (default: files paired / listed, sizes from "
                        "headers, validation labels decoded), full (decode every file, in parallel), off")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set head_dropout=0 --set test_mode=slide")


def config_overrides(items, config_type=DenseCLIPConfig) -> dict:
    """['head_dropout=0', 'test_mode=slide'] -> {'head_dropout': 0, 'test_mode': 'slide'}; fields unknown to the
    model's config dataclass fail."""
    known, out = {f.name for f in fields(config_type)}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(value)  # numbers, tuples, True/False/None
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word is a string
    return out


def class_names_arg(value: str) -> list:
    """--class-names: a text file (one name per line) or 'cat,dog,sky'. A value that looks like a path (a folder
    separator or a file extension, no comma) but names no file is a missing file, not a one-class list."""
    path = Path(value)
    if path.is_file():
        return data.read_class_names(path)
    if "," not in value and ("/" in value or os.sep in value or path.suffix in (".txt", ".names", ".csv", ".json")):
        raise MissingFileError(f"--class-names {value}: no such file (give a text file with one class name per "
                               "line, or the names themselves: 'cat,dog,sky')")
    return data.check_class_names(value.split(","))


def split_files(args, split: str):
    """(image folder, label folder, image suffix, label suffix, reduce_zero_label) of the train or val split of
    a file dataset (ade20k, folder); None for the procedural one."""
    train = split == "train"
    if args.dataset == "procedural":
        return None
    if args.dataset == "ade20k":
        root, sub = Path(args.data_root or "data/ade/ADEChallengeData2016"), "training" if train else "validation"
        return root / "images" / sub, root / "annotations" / sub, ".jpg", ".png", True
    if not args.data_root or not args.class_names:
        raise ConfigError("--dataset folder needs --data-root and --class-names")
    root, sub = Path(args.data_root), args.train_split if train else args.val_split
    return root / args.img_dir / sub, root / args.ann_dir / sub, args.img_suffix, args.seg_suffix, \
        args.reduce_zero_label


def coco_files(args, split: str):
    """(image folder, annotation json) of the train or val split of --dataset coco: the --train-* / --val-*
    options, or COCO 2017's layout under --data-root (default data/coco)."""
    train, root = split == "train", Path(args.data_root or "data/coco")
    ann = (args.train_ann if train else args.val_ann) or root / "annotations" / f"instances_{split}2017.json"
    return Path((args.train_images if train else args.val_images) or root / f"{split}2017"), Path(ann)


def dataset_class_names(args) -> list:
    if args.dataset == "procedural":
        return list(data.SHAPE_CLASSES)
    if args.dataset == "ade20k":
        return list(data.ADE20K_CLASSES)
    if not args.class_names:
        raise ConfigError("--dataset folder needs --data-root and --class-names")
    return class_names_arg(args.class_names)


def build_dataset(args, split: str, model_cfg: DenseCLIPConfig):
    """The train or val dataset named by the data options; split is 'train' or 'val'."""
    if args.model and task_of(args.model) == "detection":  # no model: zero-shot from CLIP weights (segmentation)
        return build_detection_dataset(args, split, model_cfg)
    crop, train = args.crop_size or model_cfg.input_resolution, split == "train"
    n = None if train else args.val_size or None  # 0 or unset: all
    if args.dataset == "coco":
        raise ConfigError(f"--dataset coco is detection data; {args.model} is a segmentation model")
    if args.dataset == "procedural":
        return data.ProceduralShapes(split, size=crop, length=args.train_size if train else n, seed=args.seed)
    transform = transforms.TrainTransform(scale=tuple(args.scale), crop_size=(crop, crop)) if train \
        else transforms.TestTransform(scale=tuple(args.scale))
    if args.dataset == "ade20k":
        dataset = data.ADE20K(args.data_root or "data/ade/ADEChallengeData2016", "training" if train else "validation",
                              transform, seed=args.seed)
    else:
        img_dir, ann_dir, img_suffix, seg_suffix, reduce_zero = split_files(args, split)
        dataset = data.FolderSegmentation(img_dir, ann_dir, dataset_class_names(args), transform, img_suffix,
                                          seg_suffix, reduce_zero, seed=args.seed)
    dataset.samples = dataset.samples[:n]  # (image, label) paths, sorted; [:None] keeps all
    return dataset


def build_detection_dataset(args, split: str, model_cfg):
    """Detection data: procedural shapes with boxes (images the size of the model's min_size unless --crop-size),
    or COCO-format files; Mask R-CNN's training data also gives instance masks; --val-size keeps the first N
    validation images (COCOeval then scores only those)."""
    train = split == "train"
    n = (args.train_size if train else args.val_size) or None
    masks = train and model_cfg.detector == "maskrcnn"  # instance masks: Mask R-CNN's training targets
    if args.dataset == "procedural":
        return coco.ProceduralDetection(split, size=args.crop_size or model_cfg.min_size, length=n, seed=args.seed,
                                        masks=masks)
    n = None if train else n
    if args.dataset != "coco":
        raise ConfigError(f"--dataset {args.dataset} is segmentation data; {args.model} is a detector: use "
                         "--dataset coco (COCO or a COCO-format json) or procedural")
    images, ann = coco_files(args, split)
    dataset = coco.CocoDetection(images, ann, train=train, seed=args.seed, masks=masks)
    dataset.ids = dataset.ids[:n]
    return dataset


def saved_train_args(path: str) -> dict:
    """train.py's arguments stored in one of its checkpoints; {} for other files (official .pth, CLIP .pt)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path}: no such file")
    try:  # mmap: only the small pickle is read here, not the tensors
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, KeyError):
        if is_torchscript(path):
            return {}  # an OpenAI CLIP archive: load_checkpoint reads it
        obj = load_file(path)  # a legacy-format file loads; a damaged or unsafe one raises, saying why
    return obj.get("args", {}) if isinstance(obj, dict) else {}


# ----------------------------------------------------------------------------------- distributed data
def collate_detection(batch):
    """[(image, target), ...] -> (list of images, list of targets): detection images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_device(batch, device: torch.device):
    """Move a segmentation batch (two tensors) or a detection batch (two lists) to `device`."""
    images, labels = batch
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return ([im.to(device, non_blocking=True) for im in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in labels])


def train_batches(dataset, batch_size: int, rank: int, world: int, seed: int, epoch: int, seen: int, workers: int):
    """Endless (epoch, seen, images, labels) for this rank, starting `seen` samples into `epoch`.

    Epoch e is the permutation rng(seed, e) of the dataset, cut to whole global micro-batches; rank r takes
    positions r, r + world, ... (DistributedSampler's split), batch_size at a time. After k batches on every rank
    exactly the first k * batch_size * world positions are consumed, so (epoch, seen) is the whole data state."""
    per_step = batch_size * world
    while True:
        n = len(dataset) // per_step * per_step
        if n == 0:
            raise ValueError(f"{len(dataset)} training samples make no micro-batch of {per_step}")
        mine = np.random.default_rng([seed, epoch]).permutation(len(dataset))[rank:n:world].tolist()
        batches = [mine[i:i + batch_size] for i in range(seen // world, n // world, batch_size)]
        dataset.set_epoch(epoch)  # before the loader forks its workers: they copy the dataset
        # A private generator: the loader's worker base seed must not consume the global RNG that dropout uses
        # (exact resume); the datasets draw from rng(seed, epoch, index) anyway.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=torch.cuda.is_available(),
                                             generator=torch.Generator().manual_seed(seed + epoch),
                                             collate_fn=collate_detection if is_detection(dataset) else None)
        for k, (images, labels) in enumerate(loader, 1):
            yield epoch, seen + k * per_step, images, labels
        epoch, seen = epoch + 1, 0


# ------------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict:
    """Every RNG this process draws from, as plain data (weights_only loading accepts nothing else)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def save_checkpoint(obj: dict, path: Path):
    """Atomic: a crash mid-write leaves the previous checkpoint, never a truncated one that --resume picks up."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stop_if_not_finite(losses: dict, step: int, world: int, out_dir: Path):
    """Raise TrainingError, on every rank together, when a loss term of this step is NaN or infinite. Called before
    the optimiser step, so no weight has been touched and the latest checkpoint is the last good one."""
    bad = (~torch.isfinite(torch.stack([v.float() for v in losses.values()]))).any().float()
    if world > 1:
        dist.all_reduce(bad)  # one rank's NaN stops them all (the others would wait for it forever)
    if bad.item():
        last = latest_checkpoint(out_dir)
        terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        kept = f"{last} is the last good checkpoint" if last else "no checkpoint was written yet"
        raise TrainingError(f"non-finite loss at iteration {step} ({terms}{' on this rank' if world > 1 else ''}); "
                            f"stopped before the update: {kept}. Try a lower --lr, --clip-grad 1.0, --amp none (or "
                            "bf16), or check the data with --check-data full")


def latest_checkpoint(out_dir: Path):
    paths = sorted(out_dir.glob("iter_*.pt"))  # a half-written iter_*.pt.tmp (killed mid-save) never matches
    return paths[-1] if paths else None


def prune_checkpoints(out_dir: Path, keep: int):
    """--keep N: delete all but the N latest iter_*.pt (0: keep all)."""
    if keep > 0:
        for path in sorted(out_dir.glob("iter_*.pt"))[:-keep]:
            path.unlink()


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


def image_name(dataset, index: int) -> str:
    """Where the prediction for sample `index` goes under --show-dir: the image's relative path, as .png."""
    if hasattr(dataset, "samples"):
        return Path(dataset.samples[index][0]).relative_to(dataset.img_dir).with_suffix(".png").as_posix()
    if isinstance(dataset, coco.CocoDetection):
        return Path(dataset.coco.imgs[dataset.ids[index]]["file_name"]).with_suffix(".png").as_posix()
    return f"{index:06d}.png"


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


def is_detection(obj) -> bool:
    """A detection dataset or model (their `task`); segmentation ones may not say."""
    return getattr(obj, "task", "segmentation") == "detection"


@torch.no_grad()
def evaluate(model, dataset, device, mode=None, ratios=(1.0,), flip=False, amp="none", workers=0, show_dir=None):
    """Confusion matrix of `model` on `dataset`, summed over all ranks; one image at a time (sizes differ).
    Detectors: a coco.CocoEvaluator holding every rank's detections (mode, ratios, flip unused)."""
    if is_detection(model):
        return evaluate_detection(model, dataset, device, amp, workers, show_dir)
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    cm = ConfusionMatrix(model.num_classes, model.cfg.ignore_index)
    for index, (image, label) in progress(zip(indices, loader), "eval", total=len(indices)):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)  # (1, 3, h, w)
        with autocast(device, amp):
            probs = model.predict(image, out_size=label.shape[-2:], ratios=ratios, flip=flip, mode=mode)
        pred = probs.argmax(dim=1)  # (1, H, W) at the label's resolution
        cm.update(pred, label)
        if show_dir:
            path = Path(show_dir) / image_name(dataset, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(pred[0].to(torch.uint8).cpu().numpy(), mode="P")
            im.putpalette(palette())
            im.save(path)  # a palette PNG: viewable, and its pixel values are the class indices
    cm.reduce_from_all_processes()
    return cm


@torch.no_grad()
def evaluate_detection(model, dataset, device, amp="none", workers=0, show_dir=None) -> coco.CocoEvaluator:
    """Detections on `dataset` gathered from all ranks, ready for COCOeval. One image at a time, as mmdet tests:
    a batch would pad images to a common size, and the attention pool's global token would then see the
    padding, so a detection would depend on which images it was batched with (and on the number of ranks).
    show_dir: also write each image with its detections drawn (draw_detections)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, collate_fn=collate_detection,
                                         pin_memory=device.type == "cuda")
    evaluator = coco.CocoEvaluator(dataset)
    for index, batch in zip(indices, loader):
        images, targets = to_device(batch, device)
        with autocast(device, amp):
            det = model(images)[0]  # boxes (n, 4) xyxy in the image's own pixels, scores (n,), labels (n,)
        evaluator.update(index, int(targets[0]["image_id"]), det)
        if show_dir:  # boxes, names, scores (and mask outlines) over the image
            path = Path(show_dir) / image_name(dataset, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(images[0], det, dataset.class_names).save(path)
    evaluator.reduce_from_all_processes()
    return evaluator
