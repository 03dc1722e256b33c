"""The training step's pieces: mixed precision (autocast) and the stop on a non-finite loss."""
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, TrainingError
from ..precision import at_least_fp32
from .checkpoints import NON_FINITE_HINT, last_good_checkpoint


def autocast(device: torch.device, amp: str):
    """torch.autocast for --amp {bf16, fp16}; a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)



def stop_if_not_finite(losses: dict, step: int, world: int, out_dir: Path):
    """Raise TrainingError, on every rank together, when a loss term of this step is NaN or infinite. Called before
    the optimiser step; the checkpoint it names is the newest whose tensors are all finite (save_run writes no other,
    but one from elsewhere, or from an older version, may be in the folder)."""
    bad = (~torch.isfinite(torch.stack([at_least_fp32(v) for v in losses.values()]))).any().float()
    if world > 1:
        dist.all_reduce(bad)  # one rank's NaN stops them all (the others would wait for it forever)
    if bad.item():
        last, skipped = last_good_checkpoint(out_dir)
        terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        kept = f"{last} is the last good checkpoint" if last else "no good checkpoint was written yet"
        if skipped:
            kept += f" ({', '.join(p.name for p in skipped)}: non-finite or unreadable, do not resume from it)"
        raise TrainingError(f"non-finite loss at iteration {step} ({terms}{' on this rank' if world > 1 else ''}); "
                            f"stopped before the update: {kept}. {NON_FINITE_HINT}")
