"""Evaluate a DenseCLIP segmentor: aAcc, mAcc, mIoU and a per-class IoU table (mmseg's numbers).

    python eval.py runs/denseclip_tiny/iter_003000.pt                       # our checkpoint: data/model from it
    python eval.py denseclip_fpn_res50.pth --model denseclip_r50 --dataset ade20k --aug-test   # official .pth
    torchrun --nproc_per_node 8 eval.py CKPT                                 # distributed, same numbers

Labels are compared at their original resolution: the test transform resizes only the image, and the
prediction (softmax averaged over scales and flips) is resized back to the label's size, as mmseg does.
Distributed evaluation gives each rank an unpadded shard (rank, rank + world, ...) and sums the confusion
matrices with one all_reduce, so 1 and N processes report the same mIoU (DistributedSampler would pad the
last shard with repeated images and count them twice).

This file also holds what train.py shares with it: the data options, dataset construction, the distributed
set-up and `evaluate`.
"""
import argparse
import ast
import contextlib
import json
import os
import pickle
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from denseclip import data, transforms
from denseclip.checkpoint import load_checkpoint
from denseclip.configs import CONFIGS, DenseCLIPConfig
from denseclip.metrics import ConfusionMatrix
from denseclip.segmentor import build_model

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test (with horizontal flip)


# ------------------------------------------------------------------------------------ distributed helpers
def init_distributed(device: str = None):
    """(rank, world_size, device) from the variables torchrun sets; NCCL on GPUs, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def print0(*args, **kwargs):
    """print on rank 0 only: the other ranks run the same code and would repeat every line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def autocast(device: torch.device, amp: str):
    """torch.autocast for --amp {bf16, fp16}; a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# -------------------------------------------------------------------------------------------- options
def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["procedural", "ade20k", "folder"], default="procedural",
                   help="procedural: built-in shapes, no files (default); ade20k: ADEChallengeData2016 in mmseg's "
                        "layout; folder: your own images/labels (see --img-dir)")
    g.add_argument("--data-root", help="ade20k: default data/ade/ADEChallengeData2016; folder: the dataset root")
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
    g.add_argument("--val-size", type=int, help="evaluate on the first N validation images only (quick checks; 0: all)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set head_dropout=0 --set test_mode=slide")


def config_overrides(items) -> dict:
    """['head_dropout=0', 'test_mode=slide'] -> {'head_dropout': 0, 'test_mode': 'slide'}; unknown fields fail."""
    known, out = {f.name for f in fields(DenseCLIPConfig)}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(value)  # numbers, tuples, True/False/None
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word is a string
    return out


def build_dataset(args, split: str, model_cfg: DenseCLIPConfig):
    """The train or val dataset named by the data options; split is 'train' or 'val'."""
    crop, train = args.crop_size or model_cfg.input_resolution, split == "train"
    n = None if train else args.val_size or None  # 0 or unset: all
    if args.dataset == "procedural":
        return data.ProceduralShapes(split, size=crop, length=n, seed=args.seed)
    transform = transforms.TrainTransform(scale=tuple(args.scale), crop_size=(crop, crop)) if train \
        else transforms.TestTransform(scale=tuple(args.scale))
    if args.dataset == "ade20k":
        dataset = data.ADE20K(args.data_root or "data/ade/ADEChallengeData2016", "training" if train else "validation",
                              transform, seed=args.seed)
    else:
        if not args.data_root or not args.class_names:
            raise SystemExit("--dataset folder needs --data-root and --class-names")
        names = args.class_names if Path(args.class_names).is_file() else args.class_names.split(",")
        root, sub = Path(args.data_root), args.train_split if train else args.val_split
        dataset = data.FolderSegmentation(root / args.img_dir / sub, root / args.ann_dir / sub, names, transform,
                                          args.img_suffix, args.seg_suffix, args.reduce_zero_label, seed=args.seed)
    dataset.samples = dataset.samples[:n]  # (image, label) paths, sorted; [:None] keeps all
    return dataset


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
    return f"{index:06d}.png"


@torch.no_grad()
def evaluate(model, dataset, device, mode=None, ratios=(1.0,), flip=False, amp="none", workers=0, show_dir=None):
    """Confusion matrix of `model` on `dataset`, summed over all ranks; one image at a time (sizes differ)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    cm = ConfusionMatrix(model.num_classes, model.cfg.ignore_index)
    for index, (image, label) in zip(indices, loader):
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


def saved_train_args(path: str) -> dict:
    """train.py's arguments stored in one of its checkpoints; {} for other files (official .pth, CLIP .pt)."""
    try:  # mmap: only the small pickle is read here, not the tensors
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError):
        return {}  # not a zip-format plain checkpoint (TorchScript, legacy format): load_checkpoint will tell
    return obj.get("args", {}) if isinstance(obj, dict) else {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint, official DenseCLIP .pth, or a bare state dict")
    p.add_argument("--model", choices=sorted(CONFIGS), help="config name (default: the one the checkpoint was trained "
                                                              "with; needed for official checkpoints)")
    add_data_args(p)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # datasets take one; test data ignore it
    p.add_argument("--mode", choices=["whole", "slide"], help="default: the model config's test_mode")
    p.add_argument("--aug-test", action="store_true", help=f"multi-scale {AUG_RATIOS} + flip, as the official")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0], help="test scale ratios (default 1.0)")
    p.add_argument("--flip", action="store_true", help="also average over horizontally flipped images")
    p.add_argument("--show-dir", help="write colourised predictions (palette PNGs named after the images) here")
    p.add_argument("--out", help="also write the metrics (and per-class IoU/Acc) to this JSON file")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    saved = saved_train_args(p.parse_args(argv).checkpoint)
    # Our checkpoints remember how they were trained: the data and model options default to those values.
    inherit = {"model", "dataset", "data_root", "img_dir", "ann_dir", "val_split", "img_suffix", "seg_suffix",
               "reduce_zero_label", "class_names", "scale", "crop_size", "val_size", "overrides", "seed"}
    p.set_defaults(**{k: v for k, v in saved.items() if k in inherit})
    args = p.parse_args(argv)
    if args.model is None:
        p.error("--model is required for checkpoints not written by train.py")
    if args.aug_test:
        args.ratios, args.flip = list(AUG_RATIOS), True
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    overrides = config_overrides(args.overrides)
    dataset = build_dataset(args, "val", CONFIGS[args.model]())
    model = build_model(args.model, dataset.class_names, **overrides)
    report = load_checkpoint(model, args.checkpoint)
    if report.kind != "model":
        raise SystemExit(f"{args.checkpoint} holds {report.kind} weights, not a trained segmentor")
    model.to(device)
    mode = args.mode or model.cfg.test_mode
    print0(f"evaluating {args.checkpoint} ({args.model}) on {len(dataset)} {args.dataset} images: mode {mode}, "
           f"ratios {args.ratios}, flip {args.flip}, {world} process(es)")
    cm = evaluate(model, dataset, device, mode, args.ratios, args.flip, args.amp, args.workers, args.show_dir)
    print0(cm.format_table(dataset.class_names))
    res = cm.compute()
    if args.out and rank == 0:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "model": args.model, "mode": mode,
                                              "ratios": args.ratios, "flip": args.flip, **res,
                                              "class_names": list(dataset.class_names)}, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
