"""Train-step and evaluation throughput (images/s) and peak memory of the named configs.

    python bench/throughput.py                                  # CPU-sized defaults
    python bench/throughput.py --configs denseclip_r50 fpn_clip_r50 --device cuda --batch-size 4 --amp bf16

A train step is forward + backward + AdamW step on random images and labels at the config's
official crop (input_resolution: 512 for ResNets, 640 for ViT-B); evaluation is whole-image
inference at the same size under no_grad. Evaluation must reuse the cached text features: the
bench counts text-encoder calls during the timed eval iterations and reports them (expected 0).
Peak memory is torch.cuda.max_memory_allocated on GPU (train and eval separately). On CPU it is the
peak RSS of a fresh process that ran only that config (train then eval; Python and torch included),
so each config is measured in its own subprocess.
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from denseclip.data.classes import ADE20K_CLASSES
from denseclip import build_model

DEFAULT_CONFIGS = ["denseclip_tiny", "fpn_tiny", "fpn_clip_r50", "denseclip_r50"]


def peak_rss_mib():
    """This process's peak resident memory, MiB. Linux: VmHWM, the high-water mark of this program's own address
    space. Not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's maximum there, so a child
    of a large parent reports at least the parent's size (measured: 1513 MiB for a 14 MiB child of a 1.5 GiB
    parent)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    except OSError:  # not Linux: ru_maxrss (bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure_in_subprocess(name, argv):
    """CPU: the peak RSS of a process is all we can read, so give each config a process of its own."""
    out = subprocess.run([sys.executable, __file__, "--configs", name, "--child", *argv], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(name, device, batch, iters, warmup, amp, size=None, num_classes=150):
    torch.manual_seed(0)
    model = build_model(name, ADE20K_CLASSES[:num_classes]).to(device)
    size = size or model.cfg.input_resolution
    K = model.num_classes
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, K, (batch, size, size), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    model.train()
    for i in range(warmup + iters):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with autocast:
            loss = sum(model(x, y).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    train_ips = batch * iters / (time.perf_counter() - t0)
    train_mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mib()

    model.eval()
    calls = []
    if hasattr(model, "text_encoder"):
        model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast:
        for i in range(warmup + iters):
            if i == warmup:
                sync()
                t0, calls[:] = time.perf_counter(), []
            model(x)
    sync()
    eval_ips = batch * iters / (time.perf_counter() - t0)
    eval_mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mib()
    return dict(config=name, size=size, batch=batch, train_ips=train_ips, train_mem=train_mem, eval_ips=eval_ips,
                eval_mem=eval_mem, text_calls=len(calls))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the config's official crop)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one config, JSON out
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        r = measure(args.configs[0], device, args.batch_size, args.iters, args.warmup, args.amp, args.size)
        print(json.dumps(r))
        return [r]
    child_argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("configs", "child") and v is not None]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, amp={args.amp}")
    mem = "peak MiB" if device.type == "cuda" else "process peak RSS MiB"
    print(f"{'config':24s} {'size':>5s} {'batch':>5s} {'train img/s':>12s} {'eval img/s':>11s} "
          f"{'train ' + mem:>27s} {'eval ' + mem:>26s} {'text calls in eval':>19s}")
    rows = []
    for name in args.configs:
        if device.type == "cpu":
            r = measure_in_subprocess(name, child_argv)
        else:
            r = measure(name, device, args.batch_size, args.iters, args.warmup, args.amp, args.size)
        rows.append(r)
        print(f"{name:24s} {r['size']:5d} {r['batch']:5d} {r['train_ips']:12.2f} {r['eval_ips']:11.2f} "
              f"{r['train_mem']:27.0f} {r['eval_mem']:26.0f} {r['text_calls']:19d}", flush=True)
    return rows


if __name__ == "__main__":
    main()
