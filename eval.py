"""Evaluate a DenseCLIP segmentor (aAcc, mAcc, mIoU and a per-class IoU table: mmseg's numbers) or detector
(COCOeval's 12 box AP/AR numbers and a per-class AP table: mmdet's).

    python eval.py runs/denseclip_tiny/iter_003000.pt                       # our checkpoint: data/model from it
    python eval.py denseclip_fpn_res50.pth --model denseclip_r50 --dataset ade20k --aug-test   # official .pth
    torchrun --nproc_per_node 8 eval.py CKPT                                 # distributed, same numbers
    python eval.py runs/det/iter_000750.pt --out dets.json                  # detector: COCO results JSON
    python eval.py pretrained/RN50.pt --zero-shot --dataset ade20k          # raw CLIP, no training (zeroshot.py)

Labels are compared at their original resolution: the test transform resizes only the image, and the
prediction (softmax averaged over scales and flips) is resized back to the label's size, as mmseg does.
Distributed evaluation gives each rank an unpadded shard (rank, rank + world, ...) and sums the confusion
matrices with one all_reduce, so 1 and N processes report the same mIoU (DistributedSampler would pad the
last shard with repeated images and count them twice); detections are gathered from every rank in the same way
and scored once by COCOeval; the last line is `bbox AP <AP@[.5:.95] x 100, 2 decimals>` (Mask R-CNN: then
`segm AP <mask AP>`). The shared pieces
(data options, datasets, `evaluate`) live in denseclip/engine.py, the distributed set-up in
denseclip/distributed.py.
"""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from denseclip import build_model
from denseclip.checkpoint import load_checkpoint
from denseclip.checkpoint import load_clip
from denseclip.clip import READOUTS
from denseclip.configs import CONFIGS, DenseCLIPConfig, task_of
from denseclip.run.distributed import init_distributed, print0
from denseclip.run import visualize
from denseclip.configs import config_overrides
from denseclip.data.options import add_data_args, build_dataset
from denseclip.run.checkpoints import saved_train_args
from denseclip.run.evaluate import AUG_RATIOS, evaluate, image_name
from denseclip.errors import ConfigError, run_main
from denseclip.data.preflight import check_data
from denseclip.zeroshot import TEMPLATES, ZeroShotConfig, ZeroShotSegmenter


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
    p.add_argument("--show-dir", help="segmentation: write colourised predictions (palette PNGs named after the "
                                      "images) here; detection: the images with boxes, class names, scores (and "
                                      "mask outlines) drawn over them")
    p.add_argument("--score-maps", metavar="NAMES", help="with --show-dir: also draw the score maps of these classes "
                   "(comma-separated, any names) for the first --score-map-images images (see demo.py)")
    p.add_argument("--score-map-images", type=int, default=4)
    p.add_argument("--out", help="segmentation: also write the metrics (and per-class IoU/Acc) to this JSON file; "
                                 "detection: write the detections as a COCO results JSON (xywh boxes in original "
                                 "image pixels, the dataset's own category ids); Mask R-CNN also writes the masks "
                                 "(RLE) to OUT with the suffix .segm.json")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    g = p.add_argument_group("zero-shot (no training: CHECKPOINT is an OpenAI CLIP file, the classes are the data's)")
    g.add_argument("--zero-shot", action="store_true", help="segment by CLIP's own pixel-text scores (zeroshot.py)")
    g.add_argument("--readout", choices=READOUTS, default="maskclip", help="dense read-out of the image tower")
    g.add_argument("--templates", choices=sorted(TEMPLATES), default="imagenet",
                   help="imagenet: OpenAI's 80 prompt templates averaged; photo: 'a photo of a {}.'")
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
    if args.score_maps and (args.zero_shot or not args.show_dir):
        p.error("--score-maps needs --show-dir and a trained model (not --zero-shot)")
    if args.model is None and not args.zero_shot:
        p.error("--model is required for checkpoints not written by train.py")
    if args.aug_test:
        args.ratios, args.flip = list(AUG_RATIOS), True
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    if args.zero_shot:
        return zero_shot(args, device, rank, world)
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
    res = report_results(args, model, dataset, device, mode, rank, world)
    if args.score_maps and rank == 0:
        write_score_maps(model, dataset, [n.strip() for n in args.score_maps.split(",")], args, device)
    return res


@torch.no_grad()
def write_score_maps(model, dataset, names, args, device):
    """Score-map pictures (visualize.score_picture) of the first images, at their test size, under --show-dir."""
    model.eval()
    for index in range(min(args.score_map_images, len(dataset))):
        image = dataset[index][0]  # (3, h, w) normalised
        scores = model.score_logits(image[None].to(device), names)[0] * model.cfg.tau  # (K', h, w) cosine
        picture, value_range = visualize.score_picture(visualize.denormalize(image), scores.cpu().numpy(), names)
        path = Path(args.show_dir) / image_name(dataset, index)
        visualize.save_png(picture, path.with_name(path.stem + "_scores.png"), names=names, range=value_range)


def zero_shot(args, device, rank, world):
    """Raw CLIP weights + the dataset's class names -> per-pixel argmax of the score map (no training)."""
    clip = load_clip(args.checkpoint)
    res = clip.visual.input_resolution
    dataset = build_dataset(args, "val", DenseCLIPConfig(input_resolution=res))  # procedural: CLIP's size
    mode = args.mode or "whole"
    cfg = ZeroShotConfig(args.readout, args.templates, mode, test_crop=res, test_stride=res * 2 // 3)
    print0(f"zero-shot: {args.checkpoint}, read-out {args.readout}, {len(TEMPLATES[args.templates])} template(s), "
           f"{len(dataset.class_names)} classes")
    model = ZeroShotSegmenter(clip, dataset.class_names, cfg).to(device)
    args.model = f"zero-shot {args.readout}"
    return report_results(args, model, dataset, device, mode, rank, world)


def report_results(args, model, dataset, device, mode, rank, world):
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


def segm_path(out: str) -> Path:
    """Where --out's mask results go: dets.json -> dets.segm.json."""
    return Path(out).with_suffix(".segm.json")


def evaluate_detector(args, model, dataset, device, rank, world):
    if args.mode or args.flip or args.ratios != [1.0]:
        raise SystemExit("--mode, --ratios, --flip and --aug-test are segmentation options; a detector "
                         "is tested at its config's min_size/max_size")
    print0(f"evaluating {args.checkpoint} ({args.model}) on {len(dataset)} {args.dataset} images, {world} process(es)")
    evaluator = evaluate(model, dataset, device, amp=args.amp, workers=args.workers, show_dir=args.show_dir)
    res = evaluator.compute()
    print0(evaluator.format_table(dataset.class_names))
    if args.out and rank == 0:
        Path(args.out).write_text(json.dumps(evaluator.results))
        if "segm" in res:  # Mask R-CNN: the masks (RLE) next to the boxes, as mmdet's .bbox.json / .segm.json
            segm_path(args.out).write_text(json.dumps(evaluator.segm_results))
    print0(f"bbox AP {100 * res['AP']:.2f}")
    if "segm" in res:
        print0(f"segm AP {100 * res['segm']['AP']:.2f}")
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    run_main(main)
