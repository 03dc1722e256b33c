"""Training-step speed and memory options, each as a ratio to the plain fp32 step, measured in one run, and the
fraction of the machine's measured matmul peak that the RN50 train step and evaluation reach.

    python bench/train_step.py                              # CPU: RN50 at 512, batch 1
    python bench/train_step.py --device cuda --batch-size 4 --memory-size 0   # a GPU, official sizes
    python bench/train_step.py --only-text --threads 1 --iters 5              # text encoder: shared prefix
    python bench/train_step.py --only-steps --threads 1                       # whole step before issue 18 / now

Rows (each a train step = forward + backward + AdamW step, fp32 unless named):
  bf16 autocast; channels_last (model and input); AdamW for-loop / foreach / fused; torch.compile(model);
  --checkpoint-activations; 4 accumulation steps with the text encoder once per optimiser step against once per
  micro-batch (the previous behaviour); evaluation (whole image, text features cached) in fp32 and bf16.
--only-text: the text encoder's forward + backward to the contexts (150 classes), plain path against the shared
  prompt prefix, fp32 and bf16 (in bf16 with the bf16 or the fp32 attention kernel), interleaved.
--only-steps: the whole train step as before issue 18 (plain text path; on CPU the bf16 attention kernel) against
  now, RN50 at 512 and ViT-B at 640, batch 1, 2 and 4, fp32 and bf16, with the fraction of the matmul peak and the
  peak memory of each case (a fresh process each).
Memory: peak with and without activation checkpointing for RN101 and ViT-B (train step, --memory-batch images):
torch.cuda.max_memory_allocated on GPU, on CPU the peak RSS of a fresh process per case (Python and torch
included, so differences matter, not absolutes).

FLOP rule (bench/complexity.py's: fvcore, one multiply-add = 1 flop, the same for the matmul peak: n^3 per n x n
matmul). Image path forward F_img (per image, text encoder excluded); frozen text encoder forward F_txt (all
classes, once). Train step = 3 F_img x B (forward, input gradients, weight gradients) + 2 F_txt per text pass
(forward and input gradients down to the contexts: its weights are frozen, so no weight gradients) -- one text
pass per step with text-once, one per micro-batch without. Evaluation = F_img x B (cached text).
Fraction = counted flops / time / measured peak (fp32 peak for fp32 rows, bf16 peak for bf16 rows).
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip.run.activation_checkpoint import checkpoint_activations  # noqa: E402
from denseclip.data.classes import ADE20K_CLASSES  # noqa: E402
from denseclip import build_model, clip, language  # noqa: E402
from denseclip.clip import TextEncoder  # noqa: E402
from denseclip.run.step import memory_format  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts
from throughput import peak_rss_mib  # noqa: E402

NAMES = list(ADE20K_CLASSES)  # 150 classes
DEFAULT_MAX_KEYS = clip.CPU_FP32_ATTENTION_MAX_KEYS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup):
    """Seconds per call: wall time on GPU; on CPU this process's CPU time, which other processes sharing the
    cores do not inflate (with --threads 1 it is the single-core time; with more threads it sums them)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = clock()
    for _ in range(iters):
        fn()
    sync(device)
    return (clock() - t0) / iters


def matmul_peak(device, dtype, n):
    """Multiply-adds per second of square matmuls: the best of 5 calls at each of n/2, n and 2n (one size alone
    can sit below the library's best blocking, and the model's convolutions then exceed "the peak")."""
    rates = []
    for m in (n // 2, n, 2 * n):
        a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
        matmul = functools.partial(torch.matmul, a, b)
        rates.append(m ** 3 / min(timed(matmul, device, 1, 1 if i == 0 else 0) for i in range(5)))
        del a, b, matmul
    return max(rates)


def flops(name, size):
    """(F_img per image at size x size, F_txt) in multiply-adds, counted by bench/complexity.py."""
    import complexity  # fvcore, imported only here
    row = complexity.measure(name, size, NAMES)
    return row["gflops"] * 1e9, (row["text_gflops"] or 0.0) * 1e9


def make(name, device, batch, size, channels_last=False, ckpt=False):
    torch.manual_seed(0)
    model = build_model(name, NAMES).to(device).train()
    if ckpt:
        checkpoint_activations(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 150, (batch, size, size), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x, y


def train_step_fn(model, x, y, device, amp=None, optim="default", accum=1, text_once=True):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optim]
    opt = torch.optim.AdamW(params, lr=1e-6, **kw)
    cast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    def step():
        with language.text_once_per_step(model) if text_once else contextlib.nullcontext():
            for _ in range(accum):
                with cast():
                    loss = sum(model(x, y).values()) / accum
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_memory_child(args):
    """One config, one train step, in this fresh process: print its peak memory (MiB) as JSON."""
    device = torch.device(args.device)
    model, x, y = make(args.configs[0], device, args.memory_batch, args.memory_size, ckpt=args.ckpt)
    x = x.contiguous(memory_format=set_variant(model, args.before, args.amp))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = train_step_fn(model, x, y, device, amp=torch.bfloat16 if args.amp else None)
    step()
    sync(device)
    mib = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mib()
    print(json.dumps({"mib": mib}))


def text_rows(args, device, peak):
    """The frozen text encoder's forward + backward to the contexts for the 150 classes, plain path (G*K whole
    sequences) against the shared prompt prefix (TextEncoder.share_prefix), fp32 and bf16 autocast (in bf16 also
    the attention kernel: bf16, or fp32 as clip.attention runs short sequences on CPU). The cases are timed in
    turn, one call each per round, so a change in the machine's load hits all of them; the median of the rounds
    is reported."""
    import complexity  # fvcore, imported only here
    from denseclip.configs import CONFIGS
    cfg = CONFIGS[args.config]()
    torch.manual_seed(0)
    enc = TextEncoder(cfg.class_token_length + cfg.num_contexts, cfg.vocab_size, cfg.text_width, cfg.text_heads,
                      cfg.text_layers, cfg.embed_dim).to(device).requires_grad_(False)
    texts = language.tokenize_class_names(NAMES, cfg.class_token_length, False).to(device)  # (K, 5)
    ctx = torch.randn(1, cfg.num_contexts, cfg.text_width, device=device, requires_grad=True)  # (1, M, C)
    w = torch.randn(1, len(NAMES), cfg.embed_dim, device=device)  # a fixed upstream gradient (1, K, D)
    macs = {}
    for share in (False, True):
        enc.share_prefix = share
        macs[share] = complexity.flop_analysis(enc, (texts, ctx)).total()
    print(f"text encoder ({cfg.text_width} wide, {cfg.text_layers} layers, {cfg.text_heads} heads, "
          f"{cfg.class_token_length + cfg.num_contexts} tokens), {len(NAMES)} classes, forward multiply-adds: "
          f"plain {macs[False] / 1e9:.1f} G, shared prefix {macs[True] / 1e9:.1f} G", flush=True)

    # (label, bf16 autocast, shared prefix, fp32 attention on CPU); the first row of each dtype is the code before
    # issue 18 (plain path; in bf16 also the bf16 attention kernel), which the speed-ups are relative to
    keys = clip.CPU_FP32_ATTENTION_MAX_KEYS
    cases = [("fp32, plain", False, False, keys), ("fp32, shared prefix", False, True, keys),
             ("bf16 autocast, plain, bf16 attention", True, False, 0),
             ("bf16 autocast, plain, fp32 attention", True, False, keys),
             ("bf16 autocast, shared prefix, bf16 attention", True, True, 0),
             ("bf16 autocast, shared prefix, fp32 attention", True, True, keys)]

    def fwd_bwd(label, amp, share, max_keys):
        def call():
            enc.share_prefix, clip.CPU_FP32_ATTENTION_MAX_KEYS = share, max_keys
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = enc(texts, ctx)  # (1, K, D)
            out.backward(w.to(out.dtype))
            ctx.grad = None
        return call

    times = {c: [] for c in cases}
    for c in cases * args.warmup:
        fwd_bwd(*c)()
    for _ in range(args.iters):
        for c in cases:
            times[c].append(timed(fwd_bwd(*c), device, 1, 0))
    clip.CPU_FP32_ATTENTION_MAX_KEYS, enc.share_prefix = keys, True
    print(f"{'text encoder forward + backward to the contexts':50s} {'s/call':>9s} {'speed-up':>9s} {'of peak':>7s}"
          f"  {'rounds min-max':>14s}")
    rows, median = [], lambda ts: sorted(ts)[len(ts) // 2]
    for c in cases:
        label, amp, share, _ = c
        t, before = median(times[c]), median(times[cases[2 if amp else 0]])
        frac = 2 * macs[share] / t / peak[torch.bfloat16 if amp else None]
        spread = f"{min(times[c]):.3f}-{max(times[c]):.3f}"
        print(f"{label:50s} {t:9.3f} {before / t:8.2f}x {100 * frac:6.1f}%  {spread:>14s}", flush=True)
        rows.append({"row": f"text {label}", "s": t, "ratio": before / t, "frac": frac, "all_s": times[c]})
    return rows


def set_variant(model, before: bool, amp=None):
    """The code before issue 18 (plain text path; on CPU the bf16 attention kernel for short sequences and NCHW
    tensors) or now (train.py's memory format for the dtype: NHWC for bf16 on CPU). Returns the memory format."""
    clip.CPU_FP32_ATTENTION_MAX_KEYS = 0 if before else DEFAULT_MAX_KEYS
    model.text_encoder.share_prefix = not before
    device = next(model.parameters()).device
    fmt = torch.contiguous_format if before else memory_format(device, "bf16" if amp else "none")
    model.to(memory_format=fmt)
    return fmt


def step_rows(args, device, peak):
    """The whole training step (forward, backward, AdamW), before issue 18 against now, at each --step-batches for
    each --step-configs NAME:SIZE, fp32 and bf16 autocast: the two variants timed in turn, one step each per round
    (the median of the rounds), on one model; peak memory from a fresh process per case (unless --no-step-memory)."""
    import complexity  # fvcore, imported only here
    print(f"{'whole train step':44s} {'batch':>5s} {'s/step':>8s} {'speed-up':>9s} {'of peak':>7s} "
          f"{'peak MiB':>9s}", flush=True)
    rows = []
    for spec in args.step_configs:
        name, size = spec.split(":")
        size = int(size)
        f_img, _ = flops(name, size)
        for B in args.step_batches:
            model, x, y = make(name, device, B, size)
            texts, ctx = model.texts, model.contexts  # (K, 5), (1, M, C)
            f_txt = {}
            for before in (True, False):
                set_variant(model, before)
                f_txt[before] = complexity.flop_analysis(model.text_encoder, (texts, ctx)).total()
            for amp in (None, torch.bfloat16):
                steps = {before: train_step_fn(model, x.contiguous(memory_format=set_variant(model, before, amp)),
                                               y, device, amp=amp) for before in (True, False)}
                times = {True: [], False: []}
                for r in range(args.warmup + args.iters):
                    for before in (True, False):
                        set_variant(model, before, amp)
                        t = timed(steps[before], device, 1, 0)
                        if r >= args.warmup:
                            times[before].append(t)
                med = {b: sorted(ts)[len(ts) // 2] for b, ts in times.items()}
                for before in (True, False):
                    mib = step_memory(args, name, size, B, amp, before) if args.step_memory else float("nan")
                    macs = 3 * f_img * B + 2 * f_txt[before]
                    frac = macs / med[before] / peak[amp]
                    label = f"{name} {size}, {'bf16' if amp else 'fp32'}, {'before' if before else 'now'}"
                    print(f"{label:44s} {B:5d} {med[before]:8.3f} {med[True] / med[before]:8.2f}x "
                          f"{100 * frac:6.1f}% {mib:9.0f}", flush=True)
                    rows.append({"row": label, "batch": B, "s": med[before], "ratio": med[True] / med[before],
                                 "frac": frac, "mib": mib, "all_s": times[before]})
            set_variant(model, False)
            del model, x, y
    return rows


def step_memory(args, name, size, batch, amp, before):
    """Peak memory (MiB) of one train step of this case in a fresh process (peak_memory_child)."""
    cmd = [sys.executable, __file__, "--child", "--configs", name, "--device", args.device, "--memory-batch",
           str(batch), "--memory-size", str(size)] + (["--amp"] if amp else []) + (["--before"] if before else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def eval_rows(args, device, B, f_img, row):
    """Whole-image evaluation in fp32 and bf16, text features cached."""
    model, x, _ = make(args.config, device, B, args.size)
    model.eval()
    with torch.no_grad():
        language.class_text_features(model)  # fill the cache: evaluation does not run the text encoder
        e32 = row("eval fp32 (text cached)", timed(lambda: model(x), device, args.iters, args.warmup), f_img * B)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            row("eval bf16", timed(lambda: model(x), device, args.iters, args.warmup), f_img * B, torch.bfloat16,
                base=e32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="denseclip_r50")
    p.add_argument("--size", type=int, default=512, help="train/eval crop (official RN50: 512)")
    p.add_argument("--batch-size", type=int, default=1, help="images per micro-batch")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (slow to compile on CPU)")
    p.add_argument("--only-eval", action="store_true", help="only the two evaluation rows")
    p.add_argument("--only-text", action="store_true",
                   help="only the text encoder's forward + backward, plain against the shared prompt prefix")
    p.add_argument("--only-steps", action="store_true",
                   help="only the whole train step before issue 18 against now, per --step-configs and --step-batches")
    p.add_argument("--step-configs", nargs="+", default=["denseclip_r50:512", "denseclip_vitb16:640"],
                   metavar="NAME:SIZE")
    p.add_argument("--step-batches", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--no-step-memory", dest="step_memory", action="store_false",
                   help="--only-steps without the peak-memory column (a fresh process per case)")
    p.add_argument("--only-accumulation", action="store_true",
                   help="only the baseline and the two 4-accumulation-step rows (text once per step or not)")
    p.add_argument("--memory-configs", nargs="*", default=["denseclip_r101", "denseclip_vitb16"])
    p.add_argument("--memory-size", type=int, default=256, help="crop for the memory rows (0: the config's own)")
    p.add_argument("--memory-batch", type=int, default=4, help="images for the memory rows (official: 4 per GPU)")
    p.add_argument("--threads", type=int)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return peak_memory_child(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    what = "text encoder" if args.only_text else "whole train step" if args.only_steps else \
        f"{args.config} at {args.size}x{args.size}, batch {args.batch_size}"
    print(f"torch {torch.__version__}, {where}; {what}; load average {os.getloadavg()[0]:.2f}", flush=True)

    n = 8192 if device.type == "cuda" else 2048
    peak = {None: matmul_peak(device, torch.float32, n), torch.bfloat16: matmul_peak(device, torch.bfloat16, n)}
    print(f"matmul peak (best of {n // 2}^2, {n}^2, {2 * n}^2): fp32 {peak[None] / 1e12:.3f} T multiply-adds/s, "
          f"bf16 {peak[torch.bfloat16] / 1e12:.3f} T", flush=True)
    if args.only_text:
        return text_rows(args, device, peak)
    if args.only_steps:
        return step_rows(args, device, peak)
    f_img, f_txt = flops(args.config, args.size)
    B = args.batch_size
    print(f"FLOPs (multiply-adds): image path {f_img / 1e9:.1f} G per image, frozen text encoder {f_txt / 1e9:.1f} G "
          f"per pass", flush=True)

    rows = []

    def row(label, seconds, macs=None, dtype=None, images=B, base=None):
        r = {"row": label, "s": seconds, "img_s": images / seconds,
             "ratio": (base / seconds) if base else 1.0,
             "frac": macs / seconds / peak[dtype] if macs else None}
        rows.append(r)
        frac = f"{100 * r['frac']:6.1f}%" if r["frac"] is not None else "      -"
        print(f"{label:46s} {seconds:9.3f} {r['img_s']:9.2f} {r['ratio']:8.2f}x {frac}", flush=True)
        return seconds

    print(f"{'train step (1 micro-batch unless said)':46s} {'s/step':>9s} {'img/s':>9s} {'speed-up':>9s} "
          f"{'of peak':>7s}")
    train_macs = 3 * f_img * B + 2 * f_txt
    if args.only_eval:
        return eval_rows(args, device, B, f_img, row)
    model, x, y = make(args.config, device, B, args.size)
    step = train_step_fn(model, x, y, device)
    base = row("fp32 (baseline)", timed(step, device, args.iters, args.warmup), train_macs)
    step = train_step_fn(model, x, y, device, amp=torch.bfloat16)
    if not args.only_accumulation:
        row("bf16 autocast", timed(step, device, args.iters, args.warmup), train_macs, torch.bfloat16, base=base)
    for optim in () if args.only_accumulation else ("for-loop", "foreach", "fused"):
        step = train_step_fn(model, x, y, device, optim=optim)
        row(f"AdamW {optim}", timed(step, device, args.iters, args.warmup), train_macs, base=base)
    for text_once in (False, True):
        step = train_step_fn(model, x, y, device, accum=4, text_once=text_once)
        macs = 4 * 3 * f_img * B + 2 * f_txt * (1 if text_once else 4)
        row(f"4 accumulation steps, text once per {'step' if text_once else 'micro-batch'}",
            timed(step, device, max(1, args.iters // 2), args.warmup), macs, images=4 * B,
            base=None if not text_once else rows[-1]["s"])
    del model
    if args.only_accumulation:
        return rows
    m2, x2, y2 = make(args.config, device, B, args.size, channels_last=True)
    step = train_step_fn(m2, x2, y2, device)
    row("channels_last", timed(step, device, args.iters, args.warmup), train_macs, base=base)
    del m2
    m3, x3, y3 = make(args.config, device, B, args.size, ckpt=True)
    step = train_step_fn(m3, x3, y3, device)
    row("--checkpoint-activations", timed(step, device, args.iters, args.warmup), train_macs, base=base)
    del m3
    if not args.no_compile:
        # a private kernel cache: other processes compiling into the shared default one broke loading here
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
        m4, x4, y4 = make(args.config, device, B, args.size)
        compiled = torch.compile(m4)
        params = [q for q in m4.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)

        def cstep():
            with language.text_once_per_step(m4):
                sum(compiled(x4, y4).values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        cstep()
        print(f"  (torch.compile: first step incl. compilation {time.perf_counter() - t0:.1f} s wall)", flush=True)
        row("torch.compile(model)", timed(cstep, device, args.iters, args.warmup), train_macs, base=base)
        del m4, compiled

    eval_rows(args, device, B, f_img, row)

    if args.memory_configs:
        print("\npeak memory of one train step, MiB (" + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "peak RSS of a fresh process") + f"), {args.memory_batch} images at "
              f"{args.memory_size or 'the config crop'}:")
        for name in args.memory_configs:
            mem = {}
            for ckpt in (False, True):
                size = args.memory_size or build_model(name, NAMES).cfg.input_resolution
                cmd = [sys.executable, __file__, "--child", "--configs", name, "--device", args.device,
                       "--memory-batch", str(args.memory_batch), "--memory-size", str(size)] + \
                    (["--ckpt"] if ckpt else []) + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                mem[ckpt] = json.loads(out.strip().splitlines()[-1])["mib"]
            print(f"  {name:20s} without {mem[False]:8.0f}  with --checkpoint-activations {mem[True]:8.0f}  "
                  f"({mem[True] / mem[False]:.2f}x)", flush=True)
            rows.append({"row": f"memory {name}", "without": mem[False], "with": mem[True]})
    return rows


if __name__ == "__main__":
    main()
