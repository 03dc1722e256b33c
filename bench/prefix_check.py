"""The shared prompt prefix against the plain text path on one device, in every precision a run can use: text
features and the gradients to the contexts (150 ADE20K names, post-model: one prefix; pre-model: one per image).

    python bench/prefix_check.py --device cuda     # bench/gpu_check.sh runs it
    python bench/prefix_check.py --device cpu

Cases: float64 weights (relative difference <= 1e-12), fp32, bf16 autocast, fp16 autocast with a GradScaler-scaled
backward (the gradients unscaled as GradScaler.unscale_ does; CUDA only) - reduced precision within 2e-2, the
tolerance of tests/test_prefix_sharing.py. Exit 1 when a case is outside its tolerance.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip import language  # noqa: E402
from denseclip.clip import TextEncoder  # noqa: E402
from denseclip.data.classes import ADE20K_CLASSES  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def features_and_grad(enc, texts, ctx, share, amp, scale):
    """Features (G, K, D) and d(sum(w * features) * scale)/d contexts / scale."""
    enc.share_prefix = share
    c = ctx.detach().requires_grad_()
    with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
        out = enc(texts, c)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    ((out * w).float().sum() * scale).backward()
    return out, c.grad / scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=512, help="text width (512: CLIP's)")
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cases = [("float64", torch.float64, None, 1.0, 1e-12), ("fp32", torch.float32, None, 1.0, 1e-5),
             ("bf16 autocast", torch.float32, torch.bfloat16, 1.0, 2e-2)]
    if device.type == "cuda":  # GradScaler's initial scale, 2**16
        cases.append(("fp16 autocast + GradScaler", torch.float32, torch.float16, 2.0 ** 16, 2e-2))
    texts = language.tokenize_class_names(list(ADE20K_CLASSES), 5, False).to(device)  # (150, 5)
    failed = 0
    for G in (1, 2):
        for name, dtype, amp, scale, tol in cases:
            torch.manual_seed(0)
            enc = TextEncoder(13, 49408, args.width, args.width // 64, args.layers, 1024).to(device, dtype)
            enc.requires_grad_(False)
            ctx = torch.randn(G, 8, args.width, device=device, dtype=dtype)
            f_s, g_s = features_and_grad(enc, texts, ctx, True, amp, scale)
            f_p, g_p = features_and_grad(enc, texts, ctx, False, amp, scale)
            errs = rel(f_s, f_p), rel(g_s, g_p)
            ok = max(errs) <= tol and torch.isfinite(g_s).all()
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {G} prefix(es), {name:28s} features {errs[0]:.2e}  context gradient "
                  f"{errs[1]:.2e}  (tolerance {tol:.0e})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
