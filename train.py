"""Train a DenseCLIP segmentor or detector (Rao et al., CVPR 2022): one plain loop, DDP through torchrun, AMP,
exact resume.

    python train.py                                  # denseclip_tiny on built-in procedural shapes, CPU, minutes
    torchrun --nproc_per_node 8 train.py --dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt
    torchrun --nproc_per_node 8 train.py --dataset coco --model retinanet_denseclip_r50 --pretrained pretrained/RN50.pt

The recipe reads top to bottom in `main`; one optimiser step is `train_step` (micro-batches, the text encoder once
per step, no_sync, autocast and GradScaler, the non-finite-loss stop, clipping, the update), and logging, saving and
evaluation happen around it. What differs between segmentation and detection (datasets, schedule, metric, default
recipe) is the task object of denseclip/run/tasks.py, picked from --model.

The optimisation is the official mmseg/mmcv set-up written out: AdamW, per-parameter lr/decay multipliers
(`param_groups`), poly decay with linear warmup (`lr_at`), 80k iterations at global batch 32. What differs on
purpose: SyncBN only with more than one process (official issue #24), gradient accumulation so any number of
GPUs reaches the global batch (issues #13, #30), a frozen text encoder that is not in the optimiser at all
(issue #28), and checkpoints that resume bit-exactly (data position and every RNG state included).
Detection runs the same loop with mmdet's 1x recipe: step schedule by epoch (`step_lr_at`), gradient clipping at
max-norm 0.1, 2 images x 8 GPUs, evaluation with COCOeval.
Ctrl-C or SIGTERM (a scheduler's preemption) ends the step under way, saves a checkpoint of it and stops with one
line (exit status 130 / 143); --resume auto continues from it bit-exactly (run/step.py: StopSignals).
"""
import argparse
import contextlib
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from denseclip import build_model
from denseclip.checkpoint import load_checkpoint
from denseclip.configs import CONFIGS, check_config, config_names, config_overrides
from denseclip.data.options import HelpFormatter, add_data_args
from denseclip.errors import ConfigError, number, require_file, require_package, run_main, whole
from denseclip.language import text_once_per_step
from denseclip.run.activation_checkpoint import checkpoint_activations
from denseclip.run.batches import to_device, train_batches
from denseclip.run.checkpoints import latest_checkpoint, resume, same_start_on_every_rank, save_run, seed_rng
from denseclip.run.distributed import (THREADS_HELP, convert_sync_batchnorm, cpu_threads, default_threads,
                                      init_distributed, print0, unwrap, wrap_ddp)
from denseclip.run.evaluate import evaluate
from denseclip.run.log import RunLog, TrainMeter
from denseclip.run.optim import custom_keys_for, param_groups
from denseclip.run.outputs import check_new_run, check_out_dir
from denseclip.run.step import (StopSignals, autocast, data_note, in_format, memory_format, stop_if_not_finite,
                                stopped)
from denseclip.run.tasks import TASKS, task_for

RECIPE_OPTIONS = {key for task in TASKS for _, defaults in task.recipes.values() for key in defaults}
UNSET = """  global-batch unset: batch-size x processes (no accumulation); detection: eval/save intervals unset = one
  epoch (train images // global-batch iterations); eval-interval 0: evaluation only at the end"""
EXAMPLES = """recipes:
  python train.py                                   # denseclip_tiny, procedural shapes, ~7 min on one CPU core
  python train.py --model fpn_tiny                  # its no-language baseline
  python train.py --model retinanet_denseclip_tiny  # a detector on procedural shapes (retinanet_tiny: no language)
  python train.py --model maskrcnn_denseclip_tiny   # instance segmentation on procedural shapes (maskrcnn_tiny)
  torchrun --nproc_per_node 8 train.py --dataset coco --model retinanet_denseclip_r50 --pretrained pretrained/RN50.pt
  # official ADE20K run: 8 GPUs x 4 images = global batch 32, SyncBN
  torchrun --nproc_per_node 8 train.py --dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt
  # the same global batch on ONE GPU: 8 images x 4 accumulation steps (BN statistics then cover 8 images, not 32)
  python train.py --dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt \\
      --batch-size 8 --global-batch 32 --amp bf16
  # continue the latest checkpoint of a run
  python train.py --dataset ade20k --model denseclip_r50 --out-dir runs/r50 --resume auto
"""


def defaults_help() -> str:
    """--help's defaults section, written out from the tasks' recipes (denseclip/run/tasks.py), not retyped."""
    def text(value):
        return "unset" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)

    lines = ["defaults (options left unset), by task and dataset (denseclip/run/tasks.py):"]
    for task in TASKS:
        for title, defaults in task.recipes.values():
            lines.append(f"  {task.title}, {title}:")
            lines += textwrap.wrap(", ".join(f"{k.replace('_', '-')} {text(v)}" for k, v in defaults.items()), 114,
                                   initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines) + "\n" + UNSET + "\n\n" + EXAMPLES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=defaults_help(),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="denseclip_tiny", choices=sorted(CONFIGS), metavar="NAME",
                   help="named config (denseclip_* with language, fpn_* / *_clip_* and retinanet_tiny / maskrcnn_tiny "
                        f"the baselines without it); {config_names()}")
    add_data_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=whole(1), help="optimiser steps (detection: epochs x iterations per epoch)")
    g.add_argument("--epochs", type=whole(1), help="detection: epochs of train images // global batch iterations "
                                                   "each")
    g.add_argument("--lr-steps", type=whole(1), nargs="+", help="detection: epochs at which the lr drops x0.1")
    g.add_argument("--batch-size", type=whole(1), help="images per process per forward")
    g.add_argument("--global-batch", type=whole(1), help="images per optimiser step, all processes together; "
                                                         "accumulation steps = global / (batch-size x processes)")
    g.add_argument("--lr", type=number(above=0), help="AdamW's base learning rate (groups scale it by their lr_mult)")
    g.add_argument("--weight-decay", type=number(low=0), default=1e-4,
                   help="AdamW's weight decay (x each group's decay_mult)")
    g.add_argument("--warmup-iters", type=whole(0), help="linear warmup steps at the start")
    g.add_argument("--min-lr", type=number(low=0), default=1e-6, help="segmentation: poly schedule floor (absolute, "
                                                                      "every group)")
    g.add_argument("--backbone-lr-mult", type=number(low=0), help="lr multiplier of the image encoder (0: frozen)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast dtype; fp16 (CUDA only) adds a GradScaler")
    g.add_argument("--clip-grad", type=number(above=0), help="clip the gradient norm to this (unset: no clipping)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the image encoder's residual blocks in the backward: less memory, ~1/3 more time")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default="runs/default", help="checkpoints (iter_NNNNNN.pt) and log.jsonl go here; "
                                                             "a folder holding another run needs --resume")
    g.add_argument("--resume", help="a checkpoint to continue, or 'auto': the latest in --out-dir (if any; after "
                                    "Ctrl-C or SIGTERM, the one saved then) (default: start from scratch)")
    g.add_argument("--pretrained", help="initial weights: OpenAI CLIP .pt (pretrained/RN50.pt) or a checkpoint "
                                        "(default: random weights)")
    g.add_argument("--eval-interval", type=whole(0), help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-interval", type=whole(0), help="checkpoint every N steps (0: only at the end; always at "
                                                          "the end, and at Ctrl-C or SIGTERM)")
    g.add_argument("--keep", type=whole(0), default=0, help="keep only the N latest checkpoints (default 0: all)")
    g.add_argument("--log-interval", type=whole(1), default=50, help="print the mean losses of every N steps (and on "
                                                                    "a terminal, a live line in between)")
    g.add_argument("--seed", type=whole(0, 2 ** 31 - 1), default=0,
                   help="seed of the weights, the data order and augmentation")
    g.add_argument("--workers", type=whole(0), help="DataLoader worker processes per process")
    g.add_argument("--threads", type=whole(0), help=THREADS_HELP)
    g.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    g.add_argument("--tensorboard", action="store_true", help="also log losses, lr, speed and mIoU for TensorBoard "
                                                              "under OUT_DIR/tensorboard (pip install tensorboard)")
    for action in p._actions:  # the options a task's recipe fills in (tasks.py): their defaults are the epilog's
        if action.dest in RECIPE_OPTIONS and action.dest != "train_size":
            action.help += " (default: from the recipe, see below)"
    args = p.parse_args(argv)
    for key, value in task_for(args.model).recipe(args.dataset).items():
        if getattr(args, key) is None:
            setattr(args, key, default_threads(value) if key == "threads" else value)
    return args


def check_options(args):
    """Refuse missing files, an --out-dir that cannot be written or holds another run, before anything is built
    (impossible numbers: their argparse types)."""
    if args.resume != "auto":
        require_file(args.resume, "--resume", "checkpoint")
    require_file(args.pretrained, "--pretrained", "weights file")
    check_out_dir(args.out_dir, "--out-dir")
    check_new_run(Path(args.out_dir), args.resume)
    if args.tensorboard:
        require_package("tensorboard", "--tensorboard", "tensorboard")


def accumulation(args, world: int, device: torch.device) -> int:
    """Micro-batches per optimiser step: global batch / (batch size x processes), which must divide."""
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (its GradScaler guards fp16 gradients on GPUs); on CPU use bf16")
    if args.global_batch is None:
        args.global_batch = args.batch_size * world
    accum, rem = divmod(args.global_batch, args.batch_size * world)
    if rem or accum == 0:
        raise ConfigError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
                          f"{world} process(es) = {args.batch_size * world}; pick values that divide")
    return accum


def model_config(args):
    """(config, --set overrides) of --model; a ViT's crop must be a whole number of patches."""
    overrides = config_overrides(args.overrides, type(CONFIGS[args.model]()))
    cfg = check_config(replace(CONFIGS[args.model](), **overrides))  # --set values: before the data is read
    crop = args.crop_size or cfg.input_resolution
    if cfg.backbone == "vit" and crop % cfg.patch_size:
        raise ConfigError(f"--crop-size {crop} is not a multiple of the ViT patch size {cfg.patch_size}")
    return cfg, overrides


def initialise(model, args, cfg):
    """--pretrained weights (or a note that the official recipe starts from CLIP's), --checkpoint-activations."""
    if args.pretrained:
        print0(f"initialising from {args.pretrained}:\n{load_checkpoint(model, args.pretrained)}")
    elif cfg.clip_weights:
        print0(f"note: training {args.model} from random weights; the official recipe starts from "
               f"--pretrained pretrained/{cfg.clip_weights}")
    if args.checkpoint_activations:
        print0(f"activation checkpointing: {checkpoint_activations(model)} residual blocks")


def train_step(model, batches, optimizer, scaler, accum: int, device, amp="none", clip_grad=None, step=1,
               out_dir=Path("."), dataset=None):
    """One optimiser step over `accum` micro-batches of `batches`; model: the model, or its DDP wrapper. Returns
    the step's losses averaged over its micro-batches (and the gradient norm when clipping), and the epoch and
    samples seen of the batch stream after it. step: the number this step will have, dataset: the one `batches`
    draws from (both for the NaN message, which names the step's images)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    stats, loaded = {}, []  # loaded: the step's micro-batches as loaded (host memory), read only on a NaN
    # The text encoder runs once per step, not per micro-batch: its output does not depend on the images.
    with text_once_per_step(unwrap(model), all_reduce=ddp):
        for micro in range(accum):
            epoch, seen, images, targets = next(batches)
            loaded.append((images, targets))
            images, targets = to_device((images, targets), device)  # detection: lists of images and target dicts
            images = in_format(images, memory_format(device, amp))  # NHWC for bf16 on CPU
            # Gradients are all-reduced once per optimiser step, on the last micro-batch.
            with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
                with autocast(device, amp):
                    losses = model(images, targets)  # {"loss_decode"/"loss_cls", "loss_bbox", ..., "loss_aux"}
                loss = sum(losses.values()) / accum  # accumulated grads = those of the mean over the global batch
                scaler.scale(loss).backward()
            for k, v in losses.items():
                stats[k] = stats.get(k, 0.0) + v.detach().float() / accum
    world = dist.get_world_size() if ddp else 1
    # Before the update: the last checkpoint stays good.
    stop_if_not_finite(stats, step, world, out_dir, data=lambda: data_note(loaded, dataset))
    if clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        norm = nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        stats["grad_norm"] = norm.float()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stats, epoch, seen


def validate(task, model, val_set, it: int, args, device, log: RunLog):
    """Evaluate the unwrapped model (every rank its shard), print the task's summary line, log its numbers."""
    metric = evaluate(unwrap(model), val_set, device, task, amp=args.amp, workers=min(args.workers, 2))
    model.train()
    res = metric.compute()
    print0(task.summary(res, it))
    log.write({"iter": it, **task.record(res)}, "val")
    return res, metric


def build(args, task, world: int, device):
    """The run's datasets, lr schedule, model (SyncBN with more than one process, on the device), AdamW and scaler."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    cfg, overrides = model_config(args)
    print0(task.check_data(args, args.batch_size * world))  # every data problem, before anything is trained
    train_set, val_set = task.dataset(args, "train", cfg), task.dataset(args, "val", cfg)
    lr_of = task.schedule(args, len(train_set))  # detection: also --iters and the intervals from the epochs
    model = build_model(args.model, train_set.class_names, **overrides)
    initialise(model, args, cfg)
    if world > 1:
        model = convert_sync_batchnorm(model, device)  # only here: SyncBN on a single process crashes (issue #24)
    model.to(device, memory_format=memory_format(device, args.amp))  # NHWC for bf16 on CPU
    custom_keys = custom_keys_for(args.backbone_lr_mult, train_text_encoder=not cfg.freeze_text_encoder)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, custom_keys), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return train_set, val_set, lr_of, model, optimizer, scaler


def main(argv=None):
    args = parse_args(argv)
    with cpu_threads(args.threads):
        return train(args)


def train(args):
    """The run of parsed options: data, model, the loop, the final evaluation."""
    check_options(args)
    rank, world, device = init_distributed(args.device)
    accum, task, out_dir = accumulation(args, world, device), task_for(args.model), Path(args.out_dir)
    torch.backends.cudnn.benchmark = task.cudnn_benchmark
    train_set, val_set, lr_of, model, optimizer, scaler = build(args, task, world, device)

    start_iter, epoch, seen, rng = 0, 0, 0, None
    checkpoint = latest_checkpoint(out_dir) if args.resume == "auto" else args.resume
    if checkpoint:
        start_iter, epoch, seen, rng = resume(checkpoint, model, optimizer, scaler, args.model, args.batch_size,
                                              world)
    elif args.resume == "auto":
        print0(f"--resume auto: no checkpoint in {out_dir} yet, starting from scratch")
    same_start_on_every_rank(checkpoint, start_iter, epoch, seen, world)  # nodes may not share --out-dir
    if world > 1:
        model = wrap_ddp(model, device)
    seed_rng(rng, rank, world, args.seed + start_iter)  # dropout / drop path draw differently on each rank

    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print0(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters in groups "
           f"{[(g['name'], len(g['params'])) for g in optimizer.param_groups]}; {len(train_set)} train / "
           f"{len(val_set)} val {args.dataset} images; {world} process(es) x {args.batch_size} images x {accum} "
           f"accumulation = global batch {args.global_batch}; {args.iters} iterations on {device}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused above writes nothing
    batches = train_batches(train_set, args.batch_size, rank, world, args.seed, epoch, seen, args.workers,
                            task.collate)
    log = RunLog(out_dir, rank == 0, args.tensorboard, after=start_iter)
    meter = TrainMeter(args.iters, start_iter, live=rank == 0)

    def save(step):  # on every rank (the RNG states are gathered); rank 0 writes. Returns the step saved.
        save_run(out_dir, step, unwrap(model), optimizer, scaler, {"epoch": epoch, "seen": seen}, args,
                 train_set.class_names, world)
        return step

    model.train()
    done, saved = start_iter, start_iter if args.resume == "auto" else None  # steps done, and in out_dir's newest
    with StopSignals() as stop:  # Ctrl-C / SIGTERM: noted, acted on at the next step boundary
        for it in range(start_iter, args.iters):  # `it` counts the steps done before this one
            if stop.received(world, device):  # during the last step or evaluation: stop before the next one
                break
            t0 = time.time()
            lr = lr_of(it, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_of(it, group["initial_lr"])
            stats, epoch, seen = train_step(model, batches, optimizer, scaler, accum, device, args.amp,
                                            args.clip_grad, it + 1, out_dir, train_set)
            done = step = it + 1  # steps done
            meter.add(stats, time.time() - t0, step)  # on a terminal, also the live line
            if step % args.log_interval == 0 or step == args.iters:
                line, record = meter.line(step, args.iters, epoch, lr, world)
                print0(line)
                log.write(record, "train")
            if (args.save_interval and step % args.save_interval == 0) or step == args.iters:
                saved = save(step)
            if args.eval_interval and step % args.eval_interval == 0 and step != args.iters:
                validate(task, model, val_set, step, args, device, log)
        signum = stop.received(world, device)
    if signum:  # a checkpoint of the last step done, then one line saying how to continue from it
        if done and saved != done:
            save(done)
        raise stopped(signum, done, args.iters, out_dir / f"iter_{done:06d}.pt" if done else None)

    res, metric = validate(task, model, val_set, args.iters, args, device, log)
    print0(metric.format_table(train_set.class_names))
    print0(task.final(res, f"{args.model}, {args.iters} iterations"))
    log.close()
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    run_main(main)
