"""Attention forward + backward on CPU: the bf16 kernel of F.scaled_dot_product_attention against fp32, and against
clip.attention (fp32 inside bf16 autocast up to clip.CPU_FP32_ATTENTION_MAX_KEYS keys), at the shapes DenseCLIP
runs and over sequence length: where the threshold comes from.

    python bench/attention.py            # one thread, ~1 min

CPU time per call (this process only, so other jobs on the machine inflate it little), the median of --iters.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip import clip  # noqa: E402

# name -> (sequences B, heads h, queries, keys, causal / masked); head width 64 throughout
SHAPES = {
    "text encoder, plain: 150 prompts x 13 tokens, causal": (150, 8, 13, 13, "causal"),
    "text encoder, shared prefix: 150 names x 4 tokens, 13 keys": (150, 8, 4, 13, "mask"),
    "context decoder: 150 texts over 257 visual tokens, batch 2": (2, 4, 150, 257, None),
    "RN50 attention pool at 512: 257 tokens, batch 2": (2, 32, 257, 257, None),
    "ViT-B/16 at 640: 1601 tokens, batch 1": (1, 12, 1601, 1601, None),
}


def fwd_bwd_ms(B, h, Lq, Lk, kind, mode, iters):
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, h, Lq, 64, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, h, Lk, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if kind == "mask" else None
    fn = clip.attention if mode == "clip.attention" else F.scaled_dot_product_attention

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(q, k, v, attn_mask=mask, is_causal=kind == "causal")
        out.float().sum().backward()

    call()
    times = []
    for _ in range(iters):
        t0 = time.process_time()
        call()
        times.append(time.process_time() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ("fp32", "bf16 SDPA", "clip.attention")
    print(f"torch {torch.__version__}, {args.threads} thread(s); forward + backward, ms (bf16 rows under bf16 "
          f"autocast; clip.attention runs <= {clip.CPU_FP32_ATTENTION_MAX_KEYS} keys in fp32)")
    print(f"{'shape':62s} " + " ".join(f"{m:>15s}" for m in modes))
    rows = {}
    sweep = {f"B 2, 12 heads, {L} tokens": (2, 12, L, L, None) for L in (65, 129, 257, 401, 577, 785, 1025)}
    for name, shape in {**SHAPES, **sweep}.items():
        rows[name] = [fwd_bwd_ms(*shape, mode, args.iters) for mode in modes]
        print(f"{name:62s} " + " ".join(f"{t:15.1f}" for t in rows[name]), flush=True)
    return rows


if __name__ == "__main__":
    main()
