"""The package's one precision rule: what must not run in low precision (the score map, the losses, inference
averaging, box decoding, BatchNorm statistics) runs in *at least* fp32, by promotion, never by a cast to fp32. Under
bf16/fp16 autocast those steps run in fp32; in an fp32 model nothing changes (the tensor itself comes back); a model
converted with `.double()` stays float64 end to end, so it can be checked against a reference to ~1e-14, where a
cast to fp32 anywhere would cap the agreement at ~1e-8.

No upstream counterpart: mmcv's force_fp32 and the official `.float()` calls cast, which is the same thing below
fp32 and a downcast above it. Standard library and torch only.
"""
import torch

__all__ = ["at_least_fp32", "wide_dtype"]


def wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The common floating dtype of `dtypes`, at least float32: bf16 / fp16 -> fp32, fp32 -> fp32, float64 ->
    float64 (torch.promote_types with fp32 included)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x promoted to at least float32 (x itself when it is fp32 or float64 already)."""
    return x.to(wide_dtype(x.dtype))
