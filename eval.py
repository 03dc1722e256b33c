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
`segm AP <mask AP>`). The script is argparse -> model and dataset -> the task: the evaluation loop is
denseclip/run/evaluate.py, what differs between segmentation and detection (metric, test options, --out, --show-dir
pictures) denseclip/run/tasks.py, the data options and datasets denseclip/data/options.py.
"""
import argparse
import re
import textwrap
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from denseclip import build_model
from denseclip.checkpoint import load_checkpoint, load_clip
from denseclip.configs import CONFIGS, DenseCLIPConfig, check_config, config_names, config_overrides
from denseclip.language import name_tokens
from denseclip.data.options import HelpFormatter, add_data_args, name_list
from denseclip.errors import ConfigError, UserError, number, run_main, whole
from denseclip.run.checkpoints import saved_train_args
from denseclip.run.distributed import THREADS_HELP, cpu_threads, default_threads, init_distributed, print0
from denseclip.run.evaluate import AUG_RATIOS, evaluate
from denseclip.run.outputs import check_out_dir, check_out_file
from denseclip.run.step import memory_format
from denseclip.run.tasks import SEGMENTATION, task_for
from denseclip.run.zero_shot import (PROTOCOL_SCALE, add_zero_shot_args, describe, has_background, read_queries,
                                     zero_shot_segmenter)

# The data and model options a checkpoint of ours remembers: left unset, they take the values it was trained with.
INHERIT = {"model", "dataset", "data_root", "img_dir", "ann_dir", "val_split", "img_suffix", "seg_suffix",
           "reduce_zero_label", "class_names", "scale", "crop_size", "val_size", "overrides", "seed",
           "train_ann", "train_images", "val_ann", "val_images"}


def epilog() -> str:
    """--help's note on the options a train.py checkpoint fills in, from INHERIT."""
    flags = ", ".join("--set" if k == "overrides" else f"--{k.replace('_', '-')}"
                      for k in sorted(INHERIT - {"seed", "train_ann", "train_images"}))
    return "\n".join(textwrap.wrap("a checkpoint written by train.py also sets the data and model options it was "
                                   "trained with, where they are left at the defaults shown above: " + flags, 114))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog(), formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint, official DenseCLIP .pth, or a bare state dict")
    p.add_argument("--model", choices=sorted(CONFIGS), metavar="NAME",
                   help="config name (default: the one the checkpoint was trained with; needed for official "
                        f"checkpoints); {config_names()}")
    add_data_args(p, evaluation=True)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # datasets take one; test data ignore it
    p.add_argument("--mode", choices=["whole", "slide"], help="inference on the whole image or in sliding windows "
                                                              "of the test crop (default: the config's test_mode)")
    p.add_argument("--aug-test", action="store_true", help=f"multi-scale {AUG_RATIOS} + flip, as the official")
    p.add_argument("--ratios", type=number(above=0), nargs="+", default=[1.0], help="test scale ratios (default 1.0)")
    p.add_argument("--flip", action="store_true", help="also average over horizontally flipped images")
    p.add_argument("--show-dir", help="write a picture of each prediction here, named after the image: the photo "
                                      "with the segmentation blended over it (detection: boxes, names, scores and "
                                      "masks), a title and a legend of the classes; segmentation also NAME_label.png, "
                                      "whose pixel values are the class indices (default: no pictures)")
    p.add_argument("--score-maps", metavar="NAMES", type=name_list, help="with --show-dir: also draw the score maps "
                   "of these classes (comma-separated, any names) for the first --score-map-images images (see "
                   "demo.py; default: none)")
    p.add_argument("--score-map-images", type=whole(1), default=4, help="how many images get --score-maps pictures")
    p.add_argument("--out", help="segmentation: also write the metrics (and per-class IoU/Acc) to this JSON file; "
                                 "detection: write the detections as a COCO results JSON (xywh boxes in original "
                                 "image pixels, the dataset's own category ids); Mask R-CNN also writes the masks "
                                 "(RLE) to OUT with the suffix .segm.json (default: no file)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype of the forward")
    p.add_argument("--workers", type=whole(0), default=2, help="DataLoader worker processes per process")
    p.add_argument("--threads", type=whole(0), help=THREADS_HELP + " (train.py's, for the dataset)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    add_zero_shot_args(p, evaluation=True)
    given = p.parse_args(argv)
    check_outputs(given)  # before the checkpoint is even opened: a wrong path fails now, not after the evaluation
    saved = saved_train_args(given.checkpoint)
    plain = {k: p.get_default(k) for k in INHERIT}
    p.set_defaults(**{k: v for k, v in saved.items() if k in INHERIT})
    if given.zero_shot:  # the papers' short side 336
        p.set_defaults(scale=PROTOCOL_SCALE)
    args = p.parse_args(argv)
    # Said out loud (main prints it), so that a partial (--val-size) evaluation is never taken for a full one.
    # The file's --set overrides apply even when --set is given (those given go after them): always said.
    args.from_checkpoint = {k: v for k, v in sorted(saved.items()) if k in INHERIT - {"seed"} and
                            (getattr(given, k) == plain[k] or k == "overrides") and v != plain[k]}
    if args.score_maps and not args.show_dir:
        p.error("--score-maps needs --show-dir")
    if args.model is None and not args.zero_shot:
        p.error("--model is required for checkpoints not written by train.py")
    if args.aug_test:
        args.ratios, args.flip = list(AUG_RATIOS), True
    return args


def check_outputs(args):
    """--out and --show-dir can be written (the folder of --out exists, --show-dir is no file), and --out would not
    overwrite the checkpoint: checked before any work."""
    if args.out:  # Mask R-CNN also writes OUT with the suffix .segm.json: the same folder
        check_out_file(args.out, "--out", keep=[args.checkpoint])
    if args.show_dir:
        check_out_dir(args.show_dir, "--show-dir")


def inherited(options: dict) -> str:
    """The options taken from the checkpoint, as the command-line flags that would give them."""
    return " ".join(" ".join(f"--set {x}" for x in v) if k == "overrides" else
                    f"--{k.replace('_', '-')}" if v is True else
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in options.items())


def name_inherited(error: UserError, args) -> UserError:
    """The error, told that the options it names came from the checkpoint when they did (not from the command
    line, where the user would look for them)."""
    flags = {("--set" if k == "overrides" else f"--{k.replace('_', '-')}"): k for k in args.from_checkpoint}
    named = [flag for flag in flags if re.search(re.escape(flag) + r"(?![\w-])", str(error))]
    if not named:
        return error
    return type(error)(f"{error}\n({inherited({flags[f]: args.from_checkpoint[flags[f]] for f in named})}: taken "
                       f"from {args.checkpoint}, not given on the command line; pass {' / '.join(named)} to "
                       "override)")


def trained_model(args, task):
    """A trained model (our checkpoint, an official one, or a state dict) and its task's validation set."""
    overrides = config_overrides(args.overrides, type(CONFIGS[args.model]()))
    if args.from_checkpoint:
        print0("options taken from the checkpoint: " + inherited(args.from_checkpoint))
    cfg = check_config(replace(CONFIGS[args.model](), **overrides))  # --set values: before the data is read
    print0(task.check_data(args, splits=("val",)))
    dataset = task.dataset(args, "val", cfg)
    model = build_model(args.model, dataset.class_names, **overrides)
    report = load_checkpoint(model, args.checkpoint)
    if report.kind != "model":
        raise ConfigError(f"{args.checkpoint} holds {report.kind} weights, not a trained model")
    if args.val_size:
        print0(f"note: a PARTIAL evaluation, the first {len(dataset)} validation images only (--val-size "
               f"{args.val_size}{', from the checkpoint' if 'val_size' in args.from_checkpoint else ''}); "
               "pass --val-size 0 for all")
    return model, dataset


def zero_shot_model(args, task):
    """Raw CLIP weights + the dataset's classes (their text from --class-names if given) -> the zero-shot protocol."""
    clip = load_clip(args.checkpoint)
    dataset = task.dataset(args, "val", DenseCLIPConfig(input_resolution=clip.visual.input_resolution))
    names = read_queries(args.class_names, len(dataset.class_names)) if args.class_names and \
        args.dataset != "folder" else dataset.class_names  # a folder's --class-names named its classes already
    model = zero_shot_segmenter(args, names, has_background(dataset), clip)
    print0(f"zero-shot: {args.checkpoint}, {describe(model)}")
    args.model = f"zero-shot {args.readout}"
    return model, dataset


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    if args.zero_shot:  # raw CLIP weights: segmentation, with no training
        task = SEGMENTATION
        model, dataset = zero_shot_model(args, task)
    else:
        task = task_for(args.model)
        try:
            model, dataset = trained_model(args, task)
        except UserError as e:
            raise name_inherited(e, args) from None
    model.to(device, memory_format=memory_format(device, args.amp))  # NHWC for bf16 on CPU
    if args.score_maps and task is SEGMENTATION and not args.zero_shot:  # zero-shot: CLIP's 77 tokens
        name_tokens(model, args.score_maps)  # names over the token budget fail now, not after the evaluation
    test = task.test_options(args, model)  # segmentation: mode, ratios, flip; detection: none
    how = ", ".join(f"{k} {v}" for k, v in test.items())
    print0(f"evaluating {args.checkpoint} ({args.model}) on {len(dataset)} {args.dataset} images"
           f"{': ' + how if how else ''}, {world} process(es)")
    title = (f"model {args.model}", f"checkpoint {Path(args.checkpoint).name}")
    threads = args.threads if args.threads is not None else default_threads(task.recipe(args.dataset)["threads"])
    with cpu_threads(threads):  # the training recipe's count: procedural models are small, one thread
        metric = evaluate(model, dataset, device, task, args.amp, args.workers, args.show_dir, title, **test)
    res = metric.compute()
    print0(metric.format_table(dataset.class_names))
    if args.out and rank == 0:
        task.write_out(args.out, metric, res, dataset, {"checkpoint": args.checkpoint, "model": args.model, **test,
                                                        "images": len(dataset), "val_size": args.val_size or None})
    if task.report(res):
        print0(task.report(res))
    if world > 1:
        dist.destroy_process_group()
    if args.score_maps and rank == 0:
        task.score_pictures(model, dataset, args.score_maps, args.show_dir, args.score_map_images, device)
    return res


if __name__ == "__main__":
    run_main(main)
