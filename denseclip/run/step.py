"""The training step's pieces: mixed precision (autocast), the stop on a non-finite loss, which says whether
the step's data was the cause (naming its images) or not, and the stop on a signal (Ctrl-C, a scheduler's SIGTERM)
at the next step boundary."""
import contextlib
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import ConfigError, Interrupted, TrainingError
from ..precision import at_least_fp32
from .checkpoints import NON_FINITE_HINT, last_good_checkpoint


def autocast(device: torch.device, amp: str):
    """torch.autocast for --amp {bf16, fp16}; a no-op for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)



def memory_format(device: torch.device, amp: str) -> torch.memory_format:
    """The model's and the image batches' memory format: channels_last for bf16 on CPU, where oneDNN's bf16
    convolutions run on NHWC and an NCHW tensor is transposed into and out of each one (RN50 at 512, 2 images: 28
    such copies, ~1.9 s of a 7.7 s step; 1.39x faster as NHWC, bench/README.md); NCHW otherwise (fp32 on CPU: the
    same speed either way; GPUs: not measured here)."""
    return torch.channels_last if device.type == "cpu" and amp == "bf16" else torch.contiguous_format


def in_format(images, fmt: torch.memory_format):
    """A (B, 3, H, W) image batch in memory format `fmt`; detection's lists of images as they are."""
    return images.contiguous(memory_format=fmt) if isinstance(images, torch.Tensor) and images.dim() == 4 else images


def data_note(batches, dataset=None, show: int = 8) -> str:
    """What a step's data says about its non-finite loss: the images and targets that hold NaN/inf (the data is
    the cause), or that all are finite; detection images are named by id and, when the dataset has files
    (`image_file`), by file. batches: the step's micro-batches (images, targets) as the loader gave them."""
    named, bad = [], []
    for images, targets in batches:
        for image, target in zip(images, targets):  # segmentation: per row of the (B, 3, H, W) and (B, H, W) tensors
            fields = target if isinstance(target, dict) else {"label": target}
            name = f"sample {len(named)} of the step"
            if "image_id" in fields:
                image_id = int(fields["image_id"])
                file = getattr(dataset, "image_file", None)
                name = f"image id {image_id}" + (f" ({file(image_id)})" if file else "")
            named.append(name)
            broken = [k for k, v in {"image": image, **fields}.items()
                      if v.is_floating_point() and not torch.isfinite(v).all()]
            if broken:
                bad.append(f"{name}: {' and '.join(broken)} hold NaN/inf")
    if bad:
        return f"the data is the cause: {'; '.join(bad[:show])}{' ...' if len(bad) > show else ''}; fix or drop it"
    ids = [n for n in named if n.startswith("image id")]
    return "the step's images and targets are all finite" + (f" ({', '.join(ids[:show])}"
                                                             f"{' ...' if len(ids) > show else ''})" if ids else "")


def stop_if_not_finite(losses: dict, step: int, world: int, out_dir: Path, data=None):
    """Raise TrainingError, on every rank together, when a loss term of this step is NaN or infinite. Called before
    the optimiser step; the checkpoint it names is the newest whose tensors are all finite (save_run writes no other,
    but one from elsewhere, or from an older version, may be in the folder). data: a function returning what the
    step's data says (data_note), called only then."""
    bad = (~torch.isfinite(torch.stack([at_least_fp32(v) for v in losses.values()]))).any().float()
    if world > 1:
        dist.all_reduce(bad)  # one rank's NaN stops them all (the others would wait for it forever)
    if bad.item():
        last, skipped = last_good_checkpoint(out_dir)
        terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        kept = f"{last} is the last good checkpoint" if last else "no good checkpoint was written yet"
        if skipped:
            kept += f" ({', '.join(p.name for p in skipped)}: non-finite or unreadable, do not resume from it)"
        note = f"; {data()}{' on this rank' if world > 1 else ''}" if data else ""
        raise TrainingError(f"non-finite loss at iteration {step} ({terms}{' on this rank' if world > 1 else ''})"
                            f"{note}; stopped before the update: {kept}. {NON_FINITE_HINT}")


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM are noted instead of ending the process, so that the
    training loop can finish its step, save a checkpoint and stop (`received`, asked at every step boundary); a
    second Ctrl-C, a second or more after the first, stops at once (KeyboardInterrupt: what was saved before stays).
    Sooner it is the same Ctrl-C again: under torchrun a rank gets the terminal's SIGINT and torchrun's copy of it.
    Schedulers send SIGTERM before they preempt a job (torchrun passes it on to every rank and waits
    --shutdown-timeout seconds, 30 by default, before SIGKILL). Outside the main thread, where Python cannot handle
    signals, nothing changes."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 1.0  # a second SIGINT this much later is the user pressing Ctrl-C again

    def __enter__(self):
        self.signum, self.since, self.previous = 0, 0.0, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def _note(self, signum, frame):
        if signum == signal.SIGINT == self.signum and time.monotonic() - self.since >= self.REPEAT_S:
            raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the step
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def received(self, world: int, device) -> int:
        """The signal that asks the run to stop (0: none), the same on every rank: one all_reduce (MAX) of it, so
        that all ranks stop after the same step even when the signal reached them at different moments, or only one
        of them."""
        signum = self.signum
        if world > 1:
            flag = torch.tensor([signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum


def stopped(signum: int, step: int, iters: int, checkpoint) -> Interrupted:
    """The one line a run stopped by a signal ends with: which checkpoint holds it and how to continue."""
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    if checkpoint is None:
        return Interrupted(f"{name} before the first step: nothing to save, nothing lost", signum)
    return Interrupted(f"{name} after iteration {step} of {iters}: saved {checkpoint}; to continue, run the same "
                       "command with --resume auto", signum)
