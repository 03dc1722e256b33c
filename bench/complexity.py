"""GFLOPs and parameters of the named configs, counted the way the official DenseCLIP tables were.

The official numbers (README model zoo; segmentation/get_flops.py --fvcore, torch ~1.9, mmseg 0.19, autumn
2021) are fvcore's `FlopCountAnalysis` of `forward_dummy` (whole-image encode_decode: backbone, context
decoder, neck, head, final bilinear resize to the input size) on one 1024x1024 image in eval mode, one
multiply-add counted as one flop; parameters are everything except the text encoder. We count the same
graph with the same handles, with three adjustments that keep the counts comparable:

1. Text encoder excluded from the FLOPs. get_flops.py traces it too, but the table cannot contain it: it is
   74 GFLOPs (150 classes x 13 tokens through 12 layers of width 512), and RN50-DenseCLIP minus RN50-CLIP
   is only 20.4 GFLOPs, which the attention pool alone (19.4) nearly fills. Text features are fixed at
   inference; our model caches them (`language.class_text_features(model)` in eval under no_grad), so we fill the
   cache first and count the image forward only. The text encoder is counted separately and shown.
2. Attention. In torch 1.9 attention ran as two `bmm`s (QK^T and AV) that fvcore counts; we call
   `F.scaled_dot_product_attention`, which fvcore does not know. `sdpa_flop_jit` counts the same two
   products, B*heads*Lq*Lk*(d + d_v) multiply-adds (the full Lq x Lk even when causal, as bmm did).
3. Transposed convolutions, as fvcore counted them until 0.1.5.post20211023. fvcore commit f70407e
   (2021-10-27, "Fixed flop counting for transposed convolution", PR #80) changed the count of a transposed
   conv from (output pixels x Cout x w.shape[1] x kernel) to (input pixels x prod(w.shape)). The official
   numbers predate the fix: with the old count our ViT rows match to 0.01 GFLOPs; with today's they are
   173.9 GFLOPs (16.8%) lower. The ViT pyramid's three ConvTranspose2d(768, 768, 2, stride 2) (fpn1: 64->128
   ->256, fpn2: 64->128 for a 1024 input) count 4x their input-based multiply-adds under the old rule:
   768*768*4*(16384 - 4096 + 65536 - 16384 + 16384 - 4096) = 173.95 G. Both counts are printed: "GFLOPs"
   (as the official table, the old rule) and "fvcore now" (today's rule, the real multiply-adds).
Everything else uses fvcore's default handles, unchanged since 2021: convs, linears, matmul, einsum, norms
and the bilinear/nearest resizes are counted; additions, activations, softmax and pooling are not.

Detection (the RetinaNet rows). The official detection table (README "RetinaNet": FLOPs 265 / 285 / 341 / 360 G)
was counted on mmdet's get_flops default input, 1280x800 (H x W), through `forward_dummy`: backbone, context
decoder with RANDOM text features (`dummy=True`: the text encoder is not run), score map, FPN and RetinaHead, no
anchors, decoding or NMS. We count the same graph (extract_feat + head, text features cached) with the same fvcore
handles; parameters exclude the text encoder as for segmentation. Every count rounds to the published integer
(GFLOPs within 0.07%; params 37.99, 60.45, 56.98, 78.00 M for 38, 60, 57, 78). The counter is fvcore's, not the
mmcv hook-based one that mmdet's get_flops uses by default: hooks never see the official attention pool, which
calls F.multi_head_attention_forward with its projections' weights rather than the nn.Linear modules (18.8 G at
this size), nor the score-map einsum, so by our per-module estimate mmcv would put RN50-DenseCLIP only ~1.1 G
(context decoder, wider C5 inputs) above RN50-CLIP; the published gap is 20 G, fvcore's 20.0 G. The official
DenseCLIP segmentation code ships its fvcore counter (get_flops.py --fvcore).

Mask R-CNN rows: mmdet's TwoStageDetector.forward_dummy at the same 1280x800: features, the RPN head's outputs,
the box head on 1000 proposals and the mask head on the first 100 (`use_dense_forward`). Parameters round to the
published integers (44.42, 66.70, 63.41, 84.24 M) and so do the CLIP rows' GFLOPs (301.41, 377.38, with the mask
head's deconv under the 2021 rule). The DenseCLIP rows are 5.61 G (RN50, D 1024) and 2.89 G (RN101, D 512) lower
than published (321.39 vs 327, 396.11 vs 399): the gap scales with D, while DenseCLIP - CLIP here (19.98, 18.73 G)
equals the RetinaNet gap (20, 19 G published). The released code computes nothing more for Mask R-CNN than for
RetinaNet on the DenseCLIP side (extract_feat, compute_score_maps, compute_text_features are the same lines in
both classes). The one operation that fits both rows' gap within the rounding of the published integer is a
pixel-text einsum of the 80 classes on the stride-4 grid, 80 x D x 320 x 200 = 5.24 / 2.62 G (-> 326.63, 398.73:
both round to the published 327, 399), i.e. a stride-4 score map computed as a product where the released code
upsamples the stride-32 one. Neither our model nor the released code runs it, so it is not counted; the
arithmetic and the alternatives ruled out are in bench/README.md ("The Mask R-CNN rows").

Remaining differences from the official table (measured numbers: bench/README.md) and our best explanation:
- fpn_clip_vitb16 params: ours 101.28M vs 100.8M. Hypothesis: the official row was measured with the ViT
  positional embedding stored at 512x512 (32x32+1 rows) rather than 640x640 (40x40+1): (1601 - 1025) x 768
  = 442,368 fewer parameters gives 100.84M, printed 100.8. For "100.8" the gap must lie in 0.43-0.53M; no
  other part has such a size (ln_post + proj, absent from both baselines: 0.39M; an embedding at the 224
  grid: 1.08M; decode-head width 128, the mmseg base config's, instead of 256: 2.5M), and the same embedding
  at 640 in ViT-B-DenseCLIP (ours 105.27M) matches its row. The FLOPs cannot tell: the embedding is resized
  to the 64x64 grid of a 1024 input either way.
- denseclip_r50 params: ours 50.248M vs 50.3M (-0.1%), although 50.248 prints as 50.2. No component of that
  size is missing (the identity head has no parameters; contexts 8x512 and gamma 1024 are counted). Likeliest:
  double rounding (50.248 -> 50.25 -> 50.3), which changes no other row; the only architectural fit is 16
  learned contexts instead of 8 (+4,096 -> 50.2525M), which the released RN50 config does not use.
- denseclip_r50 GFLOPs: ours 269.83 vs 269.2 (+0.23%), while RN101-DenseCLIP and both CLIP-FPN ResNet rows
  match to 0.03. The gap is exactly the final bilinear resize of the 150-class logits from 256x256 to
  1024x1024 (150 x 1024^2 x 4 = 0.629 G; 269.827 - 0.629 = 269.198): our hypothesis is that the RN50 row was
  measured without it (e.g. with an earlier forward_dummy). Nothing else of that size exists only at RN50: a
  term that grows with D (1024 for RN50, 512 for RN101) would move RN101 by half as much, and RN101 matches.
  A typo (269.8 -> 269.2) would fit as well; the numbers cannot tell these two apart.
"""
import argparse
import sys
import time
import warnings
from collections import Counter
from math import prod
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip import build_model, language  # noqa: E402
from denseclip.configs import CONFIGS, task_of  # noqa: E402
from denseclip.detection.features import extract_feat  # noqa: E402

# Input (H, W) of the official counts: get_flops.py --fvcore at 1024x1024 for segmentation, mmdet's get_flops
# default shape (1280, 800) for detection.
DEFAULT_SIZE = {"segmentation": (1024, 1024), "detection": (1280, 800)}

# Official model zoo, README of raoyongming/DenseCLIP: (GFLOPs at DEFAULT_SIZE, params M without text encoder).
OFFICIAL = {
    "fpn_clip_r50": (248.8, 31.0),
    "denseclip_r50": (269.2, 50.3),
    "fpn_clip_r101": (326.6, 50.0),
    "denseclip_r101": (346.3, 67.8),
    "fpn_clip_vitb16": (1037.4, 100.8),
    "denseclip_vitb16": (1043.1, 105.3),
    "retinanet_clip_r50": (265, 38),
    "retinanet_denseclip_r50": (285, 60),
    "retinanet_clip_r101": (341, 57),
    "retinanet_denseclip_r101": (360, 78),
    "maskrcnn_clip_r50": (301, 44),
    "maskrcnn_denseclip_r50": (327, 67),
    "maskrcnn_clip_r101": (377, 63),
    "maskrcnn_denseclip_r101": (399, 84),
}

NOTES = [
    "GFLOPs exclude the text encoder, as the official table does (text features are cached at inference); "
    "it is counted separately in the last column.",
    "GFLOPs count transposed convs as fvcore <= 0.1.5.post20211023 did (the official numbers predate fvcore's "
    "fix f70407e): 4x the real multiply-adds of the ViT pyramid's stride-2 deconvs, +173.9 G per ViT row. "
    "'fvcore now' is today's count.",
    "fpn_clip_vitb16 params +0.48M: likely the official row had the ViT positional embedding stored at 512 "
    "(1025 rows) instead of 640 (1601): -442,368 params -> 100.84M, printed 100.8.",
    "denseclip_r50 params 50.248M vs 50.3: likely double rounding (50.248 -> 50.25 -> 50.3); no part missing.",
    "denseclip_r50 GFLOPs +0.63: exactly the final 256->1024 bilinear resize of the 150 logits "
    "(150*1024^2*4 = 0.629 G -> 269.198); the official RN50 row was likely measured without it (RN101 matches "
    "with it), or 269.8 was mistyped.",
    "RetinaNet rows: 1280x800 (mmdet get_flops' default shape), forward_dummy's graph (backbone, context decoder, "
    "FPN, head; no NMS); every count rounds to the published integer (the +0.75% is 60.449 M vs '60').",
    "Mask R-CNN rows: mmdet's two-stage forward_dummy (RPN head, box head on 1000 proposals, mask head on 100); "
    "params and CLIP-row GFLOPs round to the published integers; the DenseCLIP rows are 5.61 G (D 1024) / 2.89 G "
    "(D 512) lower: exactly the size of an 80-class pixel-text einsum on the stride-4 grid (80*D*320*200 = "
    "5.24 / 2.62 G -> 326.63, 398.73), which the released code does not run (bench/README.md).",
]

# Ops whose name marks a product of tensors: if fvcore skipped one of these, the count would be too low.
MATMUL_LIKE = ("attention", "bmm", "matmul", "mm", "linear", "conv", "einsum")
SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_cudnn_attention")
LEGACY_EXTRA = "conv_transpose_2021_extra"  # by_operator key of what old fvcore added for transposed convs


def _shape(value) -> List[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """scaled_dot_product_attention(q (..., Lq, d), k (..., Lk, d), v (..., Lk, d_v)): QK^T and AV as
    multiply-adds, what the two bmm's of torch 1.9's attention counted."""
    q, k, v = (_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def conv_flop_jit_2021(inputs: List[Any], outputs: List[Any]) -> Counter:
    """fvcore's conv handle, plus, for transposed convs, what fvcore counted on top before 2021-10-27:
    B x output pixels x out_shape[1] x w.shape[1] x kernel, instead of B x input pixels x prod(w.shape)."""
    x, w, out = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
    if not inputs[6].toIValue():  # aten::_convolution's `transposed` argument
        return Counter({"conv": x[0] * prod(w) * prod(out[2:])})
    now = x[0] * prod(w) * prod(x[2:])
    legacy = x[0] * prod(out[2:]) * out[1] * w[1] * prod(w[2:])
    return Counter({"conv_transpose": now, LEGACY_EXTRA: legacy - now})


def flop_analysis(module: torch.nn.Module, inputs):
    """fvcore's FlopCountAnalysis with our attention and conv handles, quiet (we report skipped ops)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's imports touch deprecated torch.jit APIs
        from fvcore.nn import FlopCountAnalysis
    fca = FlopCountAnalysis(module, inputs)
    fca.set_op_handle(**{op: sdpa_flop_jit for op in SDPA_OPS}, **{"aten::_convolution": conv_flop_jit_2021})
    return fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_params(model: torch.nn.Module) -> int:
    """All parameters except the text encoder's (the official count: requires_grad ones minus the text
    encoder's; there every parameter required grad, the text encoder being "frozen" with lr 0)."""
    text = {id(p) for p in model.text_encoder.parameters()} if hasattr(model, "text_encoder") else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in text)


def breakdown(by_module: Dict[str, int], model: torch.nn.Module) -> Dict[str, int]:
    """FLOPs per top-level part (and the attention pool), and the rest. fvcore scopes ops by module calls;
    the segmentor calls `backbone.forward_dense` directly, so ops written in that method itself rather than in
    a submodule (the ViT's positional-embedding resize and `ln_post(x) @ proj`) land in the rest."""
    parts = {name: by_module[name] for name, _ in model.named_children() if by_module.get(name)}
    own = by_module[""] - sum(parts.values())
    if "backbone.attnpool" in by_module:
        parts["  of which backbone.attnpool"] = by_module["backbone.attnpool"]
    parts["rest (score map, final resize, forward_dense's own ops)"] = own
    return parts


DUMMY_PROPOSALS, DUMMY_MASK_ROIS = 1000, 100  # mmdet TwoStageDetector.forward_dummy: 1000 proposals, first 100 masked


def use_dense_forward(detector: torch.nn.Module):
    """What mmdet's get_flops counts (`model.forward = model.forward_dummy`): features and head outputs of one
    padded, normalised image; no resize, anchors, decoding or NMS. The official compute_score_maps also upsamples
    s / τ to the stride-4 grid in every forward (score_map0, which only the training loss reads; our model does it
    in the loss only): counted here too, 4 x K x H/4 x W/4 (0.02 G at 1280x800). Mask R-CNN (two-stage
    forward_dummy): the RPN head's outputs, then the box head on 1000 fixed proposals and the mask head on the
    first 100 of them (mmdet draws them with torch.randn; RoIAlign itself has no FLOP handle, so where they lie
    does not change the count)."""
    def features(x):
        feats, score = extract_feat(detector, x)
        if score is None:
            return feats, ()
        H, W = x.shape[-2:]  # a multiple of 32, as the padded batch: C2 is (H/4, W/4)
        return feats, (F.interpolate(score, size=(H // 4, W // 4), mode="bilinear", align_corners=False),)

    def forward(x):
        feats, score_map0 = features(x)
        out = detector.head(feats)
        return (out["cls_logits"], out["bbox_regression"], *score_map0)

    def forward_two_stage(x):
        feats, score_map0 = features(x)
        objectness, deltas = detector.rpn.head(feats)
        H, W = x.shape[-2:]
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(DUMMY_PROPOSALS, 2, generator=g) * torch.tensor([W / 2, H / 2])
        proposals = torch.cat([xy, xy + torch.rand(DUMMY_PROPOSALS, 2, generator=g) * torch.tensor([W / 2, H / 2])
                               + 1], dim=1)  # (1000, 4) valid xyxy boxes
        levels = {str(i): f for i, f in enumerate(feats)}
        heads = detector.roi_heads
        box = heads.box_head(heads.box_roi_pool(levels, [proposals], [(H, W)]))
        scores, box_deltas = heads.box_predictor(box)
        masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(levels, [proposals[:DUMMY_MASK_ROIS]],
                                                                         [(H, W)])))
        return (objectness, deltas, scores, box_deltas, masks, *score_map0)

    detector.forward = forward_two_stage if detector.cfg.detector == "maskrcnn" else forward


@torch.no_grad()
def measure(name: str, size=None, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """One row: GFLOPs of the image forward at size (an int: square; (H, W); None: the official input of the
    task), params M, text-encoder GFLOPs, diagnostics."""
    torch.manual_seed(0)
    size = DEFAULT_SIZE[task_of(name)] if size is None else (size, size) if isinstance(size, int) else tuple(size)
    model = build_model(name, class_names).eval()
    if model.task == "detection":
        use_dense_forward(model)
    t0 = time.perf_counter()
    text_gflops = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cached text features become a constant
        if model.cfg.use_text and model.cfg.prompting != "pre":
            language.class_text_features(model)  # fills the cache: the forward below no longer runs the text encoder
            text_gflops = flop_analysis(model.text_encoder, (model.texts, model.contexts)).total() / 1e9
        fca = flop_analysis(model, (torch.randn(1, 3, *size),))
        total, by_module, by_operator = fca.total(), fca.by_module(), fca.by_operator()
    if model.cfg.prompting == "pre":  # per-image prompts: the text encoder is part of the forward
        text_gflops = by_module.get("text_encoder", 0) / 1e9
    official_gflops, official_params = OFFICIAL.get(name, (None, None))
    return dict(config=name, size=size, gflops=total / 1e9, gflops_now=(total - by_operator.get(LEGACY_EXTRA, 0)) / 1e9,
                params_m=count_params(model) / 1e6, text_gflops=text_gflops,
                official_gflops=official_gflops, official_params_m=official_params,
                modules={k: v / 1e9 for k, v in breakdown(by_module, model).items()},
                by_operator={k: v / 1e9 for k, v in by_operator.items()}, unsupported=fca.unsupported_ops(),
                seconds=time.perf_counter() - t0)


def skipped_products(unsupported: Counter) -> List[str]:
    """Unsupported ops that multiply tensors (fvcore would silently count them as zero)."""
    return sorted(op for op in unsupported if any(w in op.split("::")[-1] for w in MATMUL_LIKE))


def _pct(ours: float, official: Optional[float]) -> str:
    return f"{100 * (ours - official) / official:+.2f}%" if official else "-"


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'config':<26}{'input':>10}{'GFLOPs':>9}{'official':>10}{'diff':>9}{'fvcore now':>12}"
            f"{'params M':>10}{'official':>10}{'diff':>9}{'text enc. GFLOPs':>18}")
    lines = [head, "-" * len(head)]
    for r in rows:
        og, op = r["official_gflops"], r["official_params_m"]
        text = f"{r['text_gflops']:.2f}" if r["text_gflops"] is not None else "-"
        size = "x".join(map(str, r["size"]))
        lines.append(f"{r['config']:<26}{size:>10}{r['gflops']:>9.2f}{og or '-':>10}{_pct(r['gflops'], og):>9}"
                     f"{r['gflops_now']:>12.2f}{r['params_m']:>10.3f}{op or '-':>10}{_pct(r['params_m'], op):>9}"
                     f"{text:>18}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GFLOPs (fvcore, 1 multiply-add = 1 flop) and parameters (without "
                                            "the text encoder) of named configs, next to the official DenseCLIP table.")
    p.add_argument("--configs", nargs="+", default=list(OFFICIAL), choices=list(CONFIGS), metavar="NAME",
                   help=f"named configs (default: the ten with official numbers); known: {', '.join(CONFIGS)}")
    p.add_argument("--size", type=int, nargs="+", metavar="H [W]",
                   help="input size, square if one number (default: the official one of each task: segmentation "
                        "1024x1024, detection 1280x800)")
    p.add_argument("--verbose", action="store_true", help="per-module and per-operator GFLOPs, uncounted ops")
    return p.parse_args(argv)


def main(argv=None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    rows, t0 = [], time.perf_counter()
    for name in args.configs:
        row = measure(name, None if args.size is None else (args.size * 2)[:2])  # one number: square
        rows.append(row)
        if args.verbose:
            h, w = row["size"]
            print(f"\n{name} @ {h}x{w}: {row['gflops']:.2f} GFLOPs, traced in {row['seconds']:.1f} s")
            for part, g in row["modules"].items():
                print(f"  {part:<56}{g:>9.2f}")
            print("  by operator: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["by_operator"].items())))
            print("  no handle (counted as 0 by fvcore's convention): " + ", ".join(sorted(row["unsupported"])))
        skipped = skipped_products(row["unsupported"])
        if skipped:
            print(f"WARNING {name}: fvcore skipped product ops {skipped}; its count is too low")
    print("\nGFLOPs (fvcore, 1 multiply-add = 1 flop) at the input shown, params without the text encoder:")
    print(format_table(rows))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f} s in all")
    return rows


if __name__ == "__main__":
    main()
