"""Train a DenseCLIP segmentor or detector (Rao et al., CVPR 2022): one plain loop, DDP through torchrun, AMP,
exact resume.

    python train.py                                  # denseclip_tiny on built-in procedural shapes, CPU, minutes
    torchrun --nproc_per_node 8 train.py --dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt
    torchrun --nproc_per_node 8 train.py --dataset coco --model retinanet_denseclip_r50 --pretrained pretrained/RN50.pt

The optimisation is the official mmseg/mmcv set-up written out: AdamW, per-parameter lr/decay multipliers
(`param_groups`), poly decay with linear warmup (`lr_at`), 80k iterations at global batch 32. What differs on
purpose: SyncBN only with more than one process (official issue #24), gradient accumulation so any number of
GPUs reaches the global batch (issues #13, #30), a frozen text encoder that is not in the optimiser at all
(issue #28), and checkpoints that resume bit-exactly (data position and every RNG state included).
Detection (the task follows from --model) runs the same loop with mmdet's 1x recipe: step schedule by epoch
(`step_lr_at`), gradient clipping at max-norm 0.1, 2 images x 8 GPUs, evaluation with COCOeval.
"""
import argparse
import contextlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from denseclip import build_model
from denseclip.run.activation_checkpoint import checkpoint_activations
from denseclip.checkpoint import load_checkpoint, load_file
from denseclip.run.coco_eval import STAT_NAMES
from denseclip.configs import CONFIGS, task_of
from denseclip.run.distributed import convert_sync_batchnorm, init_distributed, print0, reduce_mean
from denseclip.configs import config_overrides
from denseclip.data.options import add_data_args, build_dataset
from denseclip.run.batches import to_device, train_batches
from denseclip.run.checkpoints import latest_checkpoint, prune_checkpoints, rng_state, save_checkpoint, set_rng_state
from denseclip.run.evaluate import evaluate
from denseclip.run.step import autocast, stop_if_not_finite
from denseclip.errors import ConfigError, require_file, run_main
from denseclip.language import text_once_parameters, text_once_per_step
from denseclip.run.optim import CUSTOM_KEYS, lr_at, param_groups, step_lr_at
from denseclip.data.preflight import check_data

# Options left unset take these values. ADE20K and user folders: the official 80k schedule at global batch 32
# (4 images x 8 GPUs). Procedural: a CPU-sized run of the tiny models, about 6 minutes on 2 cores; it starts from
# random weights (no CLIP weights for the tiny models), so it uses a higher lr, a short warmup and no backbone
# lr reduction (x0.1 protects pretrained CLIP weights, of which there are none here).
DEFAULTS = {
    "official": dict(iters=80000, batch_size=4, global_batch=32, lr=1e-4, warmup_iters=1500, backbone_lr_mult=0.1,
                     eval_interval=8000, save_interval=8000, workers=4),
    "procedural": dict(iters=3000, batch_size=8, global_batch=None, lr=2e-3, warmup_iters=50, backbone_lr_mult=1.0,
                       eval_interval=1000, save_interval=1000, workers=0),
    # Detection (retinanet_*): mmdet's COCO 1x, 12 epochs at global batch 16 (2 images x 8 GPUs), lr x0.1 at
    # epochs 8 and 11, evaluation and checkpoint every epoch (eval/save intervals left unset = one epoch).
    "detection_official": dict(epochs=12, lr_steps=[8, 11], batch_size=2, global_batch=16, lr=1e-4,
                               warmup_iters=500, backbone_lr_mult=0.1, clip_grad=0.1, workers=2),
    # Mask R-CNN on COCO: the same 1x recipe at twice the lr (every official mask_rcnn_*_fpn_1x_coco config: 2e-4).
    "maskrcnn_official": dict(epochs=12, lr_steps=[8, 11], batch_size=2, global_batch=16, lr=2e-4,
                              warmup_iters=500, backbone_lr_mult=0.1, clip_grad=0.1, workers=2),
    # Procedural detection: the same 1x shape (12 epochs, steps at 8 and 11) over 2000-image epochs, sized like
    # the procedural segmentation run (3000 steps of 8 images); from random weights, like it.
    "detection_procedural": dict(epochs=12, lr_steps=[8, 11], batch_size=8, global_batch=None, lr=1e-3,
                                 warmup_iters=50, backbone_lr_mult=1.0, clip_grad=1.0, eval_interval=1000,
                                 save_interval=1000, workers=0),
    # Mask R-CNN (maskrcnn_*) on procedural shapes: the same 12-epoch shape, but a step costs about three RetinaNet
    # steps on CPU (RPN, two RoI heads, mask targets), so 640-image epochs of 4-image steps (1920 iterations).
    "maskrcnn_procedural": dict(epochs=12, train_size=640, lr_steps=[8, 11], batch_size=4, global_batch=None,
                                lr=1e-3, warmup_iters=50, backbone_lr_mult=1.0, clip_grad=1.0, eval_interval=0,
                                save_interval=1000, workers=0),
}

EPILOG = """defaults (options left unset):
  --dataset ade20k / folder: iters 80000, batch-size 4, global-batch 32, lr 1e-4, warmup-iters 1500,
      backbone-lr-mult 0.1, eval/save every 8000, workers 4                              (the official recipe)
  --dataset procedural: iters 3000, batch-size 8, global-batch = batch-size x processes, lr 2e-3,
      warmup-iters 50, backbone-lr-mult 1.0, eval/save every 1000, workers 0  (tiny model from random weights)
  detection (--model retinanet_*), --dataset coco: epochs 12, lr-steps 8 11, batch-size 2, global-batch 16,
      lr 1e-4, warmup-iters 500 (from lr x 0.001), backbone-lr-mult 0.1, clip-grad 0.1, eval/save every epoch,
      workers 2                                                                   (mmdet's 1x recipe)
  Mask R-CNN (--model maskrcnn_*), --dataset coco: the same with lr 2e-4                 (the official configs)
  detection, --dataset procedural: epochs 12 of 2000 images (3000 iterations), lr-steps 8 11, batch-size 8,
      lr 1e-3, warmup-iters 50, backbone-lr-mult 1.0, clip-grad 1.0, eval/save every 1000, workers 0
  Mask R-CNN (--model maskrcnn_*), --dataset procedural: epochs 12 of 640 images (1920 iterations), lr-steps
      8 11, batch-size 4, lr 1e-3, warmup-iters 50, backbone-lr-mult 1.0, clip-grad 1.0, evaluation at the end

recipes:
  python train.py                                   # denseclip_tiny, procedural shapes, ~6 min on 2 CPU cores
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="denseclip_tiny", choices=sorted(CONFIGS),
                   help="named config (denseclip_* with language, fpn_* the plain-FPN baselines)")
    add_data_args(p)
    g = p.add_argument_group("optimisation (unset: see defaults below)")
    g.add_argument("--iters", type=int, help="optimiser steps (detection: default epochs x iterations per epoch)")
    g.add_argument("--epochs", type=int, help="detection: epochs of train images // global batch iterations each")
    g.add_argument("--lr-steps", type=int, nargs="+", help="detection: epochs at which the lr drops x0.1")
    g.add_argument("--batch-size", type=int, help="images per process per forward")
    g.add_argument("--global-batch", type=int, help="images per optimiser step, all processes together; "
                                                    "accumulation steps = global / (batch-size x processes)")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-iters", type=int)
    g.add_argument("--min-lr", type=float, default=1e-6, help="segmentation: poly schedule floor (absolute, every "
                                                             "group)")
    g.add_argument("--backbone-lr-mult", type=float, help="lr multiplier of the image encoder")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast dtype; fp16 (CUDA only) adds a GradScaler")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: off)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the image encoder's residual blocks in the backward: less memory, ~1/3 more time")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default="runs/default")
    g.add_argument("--resume", help="a checkpoint to continue, or 'auto': the latest in --out-dir (if any)")
    g.add_argument("--pretrained", help="initial weights: OpenAI CLIP .pt (pretrained/RN50.pt) or a checkpoint")
    g.add_argument("--eval-interval", type=int, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-interval", type=int, help="checkpoint every N steps (and always at the end)")
    g.add_argument("--keep", type=int, default=0, help="keep only the N latest checkpoints (default 0: all)")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, help="DataLoader worker processes per process")
    g.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    g.add_argument("--tensorboard", action="store_true", help="also log losses, lr, speed and mIoU for TensorBoard "
                                                              "under OUT_DIR/tensorboard (pip install tensorboard)")
    args = p.parse_args(argv)
    recipe = "procedural" if args.dataset == "procedural" else "official"
    if task_of(args.model) == "detection":
        recipe = "detection_" + recipe
        if CONFIGS[args.model]().detector == "maskrcnn":
            recipe = recipe.replace("detection_", "maskrcnn_")
    for key, value in DEFAULTS[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def tensorboard_writer(log_dir: Path):
    """torch.utils.tensorboard's SummaryWriter, imported only when asked for: tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'denseclip[tensorboard]'); log.jsonl is written either way") from None
    return SummaryWriter(str(log_dir))


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.resume != "auto":
        require_file(args.resume, "--resume", "checkpoint")  # before anything is built
    require_file(args.pretrained, "--pretrained", "weights file")
    for name in ("iters", "batch_size", "log_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    rank, world, device = init_distributed(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (its GradScaler guards fp16 gradients on GPUs); on CPU use bf16")
    if args.global_batch is None:
        args.global_batch = args.batch_size * world
    accum, rem = divmod(args.global_batch, args.batch_size * world)
    if rem or accum == 0:
        raise ConfigError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
                         f"{world} process(es) = {args.batch_size * world}; pick values that divide")
    out_dir = Path(args.out_dir)
    detection = task_of(args.model) == "detection"
    # Fixed crop sizes: let cuDNN pick its fastest kernels (as mmseg); detection images differ in size (as mmdet).
    torch.backends.cudnn.benchmark = not detection

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    overrides = config_overrides(args.overrides, type(CONFIGS[args.model]()))
    cfg = replace(CONFIGS[args.model](), **overrides)
    crop = args.crop_size or cfg.input_resolution
    if cfg.backbone == "vit" and crop % cfg.patch_size:
        raise ConfigError(f"--crop-size {crop} is not a multiple of the ViT patch size {cfg.patch_size}")
    print0(check_data(args, args.batch_size * world))  # every data problem, before anything is trained
    train_set, val_set = build_dataset(args, "train", cfg), build_dataset(args, "val", cfg)
    if detection:  # mmdet counts in epochs: one is len(train) // global batch optimiser steps here
        per_epoch = max(len(train_set) // args.global_batch, 1)
        args.iters = args.iters or args.epochs * per_epoch
        lr_steps = [e * per_epoch for e in args.lr_steps]
        args.eval_interval = per_epoch if args.eval_interval is None else args.eval_interval
        args.save_interval = per_epoch if args.save_interval is None else args.save_interval
    model = build_model(args.model, train_set.class_names, **overrides)
    if args.pretrained:
        print0(f"initialising from {args.pretrained}:\n{load_checkpoint(model, args.pretrained)}")
    elif cfg.clip_weights:
        print0(f"note: training {args.model} from random weights; the official recipe starts from "
               f"--pretrained pretrained/{cfg.clip_weights}")
    if args.checkpoint_activations:
        print0(f"activation checkpointing: {checkpoint_activations(model)} residual blocks")
    if world > 1:
        model = convert_sync_batchnorm(model, device)  # only here: SyncBN on a single process crashes (issue #24)
    model.to(device)
    model_without_ddp = model
    custom_keys = dict(CUSTOM_KEYS, backbone={"lr_mult": args.backbone_lr_mult})
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, custom_keys), lr=args.lr,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_iter, epoch, seen = 0, 0, 0
    resume = latest_checkpoint(out_dir) if args.resume == "auto" else args.resume
    if resume:
        ckpt = load_file(resume)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "iter"} <= set(ckpt):
            raise ConfigError(f"--resume {resume} is not a train.py checkpoint (no optimizer / iteration state); "
                              "to start from its weights use --pretrained")
        if ckpt.get("args", {}).get("model", args.model) != args.model:
            raise ConfigError(f"--resume {resume} was trained with --model {ckpt['args']['model']}, this run is "
                              f"--model {args.model}: pass --model {ckpt['args']['model']} or another --out-dir")
        load_checkpoint(model_without_ddp, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter, epoch, seen = ckpt["iter"], ckpt["data"]["epoch"], ckpt["data"]["seen"]
        if seen % (args.batch_size * world):
            raise ConfigError(f"{resume} stopped {seen} samples into an epoch: not a whole number of micro-batches "
                             f"of {args.batch_size} x {world}")
        print0(f"resumed from {resume} at iteration {start_iter} (epoch {epoch}, sample {seen})")
    elif args.resume == "auto":
        print0(f"--resume auto: no checkpoint in {out_dir} yet, starting from scratch")
    # The text encoder runs once per optimiser step, not once per micro-batch (PixelTextMatching.text_once_per_step);
    # its backward happens after the micro-batches', outside DDP, so its parameters leave DDP's reducer and are
    # averaged over the ranks by text_once_per_step itself.
    if world > 1:
        text_params = {id(p) for p in text_once_parameters(model)}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, p in model.named_parameters() if id(p) in text_params])
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if resume and len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank])
    else:  # dropout / drop path draw differently on each rank
        torch.manual_seed(args.seed + rank + start_iter)
        np.random.seed(args.seed + rank + start_iter)
        random.seed(args.seed + rank + start_iter)

    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print0(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters in groups "
           f"{[(g['name'], len(g['params'])) for g in optimizer.param_groups]}; {len(train_set)} train / "
           f"{len(val_set)} val {args.dataset} images; {world} process(es) x {args.batch_size} images x {accum} "
           f"accumulation = global batch {args.global_batch}; {args.iters} iterations on {device}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused above writes nothing
    batches = train_batches(train_set, args.batch_size, rank, world, args.seed, epoch, seen, args.workers)
    log_file = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    writer = tensorboard_writer(out_dir / "tensorboard") if args.tensorboard and rank == 0 else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if writer:  # the same numbers: train/loss_decode, train/lr, ..., val/mIoU against the iteration
            group = "val" if "mIoU" in record else "train"
            for k, v in record.items():
                if k != "iter":
                    writer.add_scalar(f"{group}/{k}", v, record["iter"])
            writer.flush()

    def run_eval(it):
        cm = evaluate(model_without_ddp, val_set, device, amp=args.amp, workers=min(args.workers, 2))
        model.train()
        res = cm.compute()
        if detection:  # cm: a coco.CocoEvaluator; res["segm"]: the mask numbers (Mask R-CNN)
            segm = res.get("segm")
            print0(f"iter {it}: bbox AP {100 * res['AP']:.2f}  AP50 {100 * res['AP50']:.2f}  "
                   f"AP75 {100 * res['AP75']:.2f}" + (f"  segm AP {100 * segm['AP']:.2f}" if segm else ""))
            log({"iter": it, **{k: res[k] for k in STAT_NAMES},
                 **({f"segm_{k}": segm[k] for k in STAT_NAMES} if segm else {})})
            return res, cm
        print0(f"iter {it}: val mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}  "
               f"aAcc {100 * res['aAcc']:.2f}")
        log({"iter": it, **{k: res[k] for k in ("mIoU", "mAcc", "aAcc")}})
        return res, cm

    def lr_of(it, base_lr):
        if detection:
            return step_lr_at(it, base_lr, lr_steps, args.warmup_iters)
        return lr_at(it, base_lr, args.iters, args.warmup_iters, args.min_lr)

    model.train()
    sums, n_logged, busy = {}, 0, 0.0  # busy: seconds spent in training steps since the last log line
    for it in range(start_iter, args.iters):  # `it` counts the steps done before this one
        t0 = time.time()
        lr = lr_of(it, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_of(it, group["initial_lr"])
        step_losses = {}
        with text_once_per_step(model_without_ddp, all_reduce=world > 1):
            for micro in range(accum):
                epoch, seen, images, labels = next(batches)
                images, labels = to_device((images, labels), device)  # detection: lists of images and target dicts
                # Gradients are all-reduced once per optimiser step, on the last micro-batch.
                sync = world == 1 or micro == accum - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast(device, args.amp):
                        losses = model(images, labels)  # {"loss_decode"/"loss_cls", "loss_bbox", ..., "loss_aux"}
                    loss = sum(losses.values()) / accum  # accumulated grads = those of the mean over the global batch
                    scaler.scale(loss).backward()
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / accum
        stop_if_not_finite(step_losses, it + 1, world, out_dir)  # before the update: the last checkpoint stays good
        for k, v in step_losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if args.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            norm = nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm.float()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step = it + 1  # steps done
        n_logged, busy = n_logged + 1, busy + time.time() - t0

        if step % args.log_interval == 0 or step == args.iters:
            avg = {k: v / n_logged for k, v in reduce_mean(sums, world).items()}
            avg["loss"] = sum(v for k, v in avg.items() if k.startswith("loss"))
            speed = n_logged / busy
            eta = (args.iters - step) / speed
            print0(f"iter {step}/{args.iters}  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items()) +
                   f"  lr {lr:.3g}  {speed:.2f} it/s  eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                   f"{int(eta % 60):02d}")
            log({"iter": step, "epoch": epoch, **avg, "lr": lr, "it_per_s": speed, "eta_s": eta})
            sums, n_logged, busy = {}, 0, 0.0
        if (args.save_interval and step % args.save_interval == 0) or step == args.iters:
            states = [None] * world
            if world > 1:
                dist.all_gather_object(states, rng_state())  # each rank's dropout stream, for an exact resume
            else:
                states = [rng_state()]
            if rank == 0:
                save_checkpoint({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict(), "iter": step, "data": {"epoch": epoch, "seen": seen},
                                 "rng": states, "args": vars(args), "class_names": list(train_set.class_names)},
                                out_dir / f"iter_{step:06d}.pt")
                prune_checkpoints(out_dir, args.keep)
        if args.eval_interval and step % args.eval_interval == 0 and step != args.iters:
            run_eval(step)

    res, cm = run_eval(args.iters)
    print0(cm.format_table(train_set.class_names))
    if detection:
        print0(f"{args.model}, {args.iters} iterations:\nbbox AP {100 * res['AP']:.2f}" +
               (f"\nsegm AP {100 * res['segm']['AP']:.2f}" if "segm" in res else ""))
    else:
        print0(f"val mIoU {100 * res['mIoU']:.2f} ({args.model}, {args.iters} iterations)")
    if log_file:
        log_file.close()
    if writer:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    run_main(main)
