"""Evaluate a DenseCLIP segmentor (aAcc, mAcc, mIoU and a per-class IoU table: mmseg's numbers) or detector
(COCOeval's 12 box AP/AR numbers and a per-class AP table: mmdet's).

    python eval.py runs/denseclip_tiny/iter_003000.pt                       # our checkpoint: data/model from it
    python eval.py denseclip_fpn_res50.pth --model denseclip_r50 --dataset ade20k --aug-test   # official .pth
    torchrun --nproc_per_node 8 eval.py CKPT                                 # distributed, same numbers
    python eval.py runs/det/iter_000750.pt --out dets.json                  # detector: COCO results JSON

Labels are compared at their original resolution: the test transform resizes only the image, and the
prediction (softmax averaged over scales and flips) is resized back to the label's size, as mmseg does.
Distributed evaluation gives each rank an unpadded shard (rank, rank + world, ...) and sums the confusion
matrices with one all_reduce, so 1 and N processes report the same mIoU (DistributedSampler would pad the
last shard with repeated images and count them twice); detections are gathered from every rank in the same way
and scored once by COCOeval; the last line is `bbox AP <AP@[.5:.95] x 100, 2 decimals>`. The shared pieces
(data options, datasets, `evaluate`) live in denseclip/engine.py, the distributed set-up in
denseclip/distributed.py.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from denseclip import build_model
from denseclip.checkpoint import load_checkpoint
from denseclip.configs import CONFIGS, task_of
from denseclip.distributed import init_distributed, print0
from denseclip.engine import AUG_RATIOS, add_data_args, build_dataset, config_overrides, evaluate, saved_train_args
from denseclip.errors import ConfigError, run_main
from denseclip.preflight import check_data


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
    p.add_argument("--out", help="segmentation: also write the metrics (and per-class IoU/Acc) to this JSON file; "
                                 "detection: write the detections as a COCO results JSON (xywh boxes in original "
                                 "image pixels, the dataset's own category ids)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    given = p.parse_args(argv)
    saved = saved_train_args(given.checkpoint)
    # Our checkpoints remember how they were trained: the data and model options default to those values.
    inherit = {"model", "dataset", "data_root", "img_dir", "ann_dir", "val_split", "img_suffix", "seg_suffix",
               "reduce_zero_label", "class_names", "scale", "crop_size", "val_size", "overrides", "seed",
               "train_ann", "train_images", "val_ann", "val_images"}
    plain = {k: p.get_default(k) for k in inherit}
    p.set_defaults(**{k: v for k, v in saved.items() if k in inherit})
    args = p.parse_args(argv)
    # Said out loud (main prints it), so that a partial (--val-size) evaluation is never taken for a full one.
    args.from_checkpoint = {k: v for k, v in sorted(saved.items()) if k in inherit - {"seed"} and
                            getattr(given, k) == plain[k] and v != plain[k]}
    if args.model is None:
        p.error("--model is required for checkpoints not written by train.py")
    if args.aug_test:
        args.ratios, args.flip = list(AUG_RATIOS), True
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    overrides = config_overrides(args.overrides, type(CONFIGS[args.model]()))
    if args.from_checkpoint:
        print0("options taken from the checkpoint: " + " ".join(
            " ".join(f"--set {x}" for x in v) if k == "overrides" else
            f"--{k.replace('_', '-')}" if v is True else
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in args.from_checkpoint.items()))
    print0(check_data(args, splits=("val",)))
    dataset = build_dataset(args, "val", replace(CONFIGS[args.model](), **overrides))
    model = build_model(args.model, dataset.class_names, **overrides)
    report = load_checkpoint(model, args.checkpoint)
    if report.kind != "model":
        raise ConfigError(f"{args.checkpoint} holds {report.kind} weights, not a trained model")
    if args.val_size:
        print0(f"note: a PARTIAL evaluation, the first {len(dataset)} validation images only (--val-size "
               f"{args.val_size}{', from the checkpoint' if 'val_size' in args.from_checkpoint else ''}); "
               "pass --val-size 0 for all")
    model.to(device)
    if task_of(args.model) == "detection":
        return evaluate_detector(args, model, dataset, device, rank, world)
    mode = args.mode or model.cfg.test_mode
    print0(f"evaluating {args.checkpoint} ({args.model}) on {len(dataset)} {args.dataset} images: mode {mode}, "
           f"ratios {args.ratios}, flip {args.flip}, {world} process(es)")
    cm = evaluate(model, dataset, device, mode, args.ratios, args.flip, args.amp, args.workers, args.show_dir)
    print0(cm.format_table(dataset.class_names))
    res = cm.compute()
    if args.out and rank == 0:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "model": args.model, "mode": mode,
                                              "ratios": args.ratios, "flip": args.flip, "images": len(dataset),
                                              "val_size": args.val_size or None, **res,
                                              "class_names": list(dataset.class_names)}, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return res


def evaluate_detector(args, model, dataset, device, rank, world):
    if args.mode or args.flip or args.show_dir or args.ratios != [1.0]:
        raise SystemExit("--mode, --ratios, --flip, --aug-test and --show-dir are segmentation options; a detector "
                         "is tested at its config's min_size/max_size")
    print0(f"evaluating {args.checkpoint} ({args.model}) on {len(dataset)} {args.dataset} images, {world} process(es)")
    evaluator = evaluate(model, dataset, device, amp=args.amp, workers=args.workers)
    res = evaluator.compute()
    print0(evaluator.format_table(dataset.class_names))
    if args.out and rank == 0:
        Path(args.out).write_text(json.dumps(evaluator.results))
    print0(f"bbox AP {100 * res['AP']:.2f}")
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    run_main(main)
