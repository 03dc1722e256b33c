"""What a training run writes down: the averaged losses of the last log interval as one printed line, and every
record (training and evaluation) in OUT_DIR/log.jsonl and, with --tensorboard, as TensorBoard scalars.

mmcv's TextLoggerHook and TensorboardLoggerHook in two small classes: only rank 0 writes; the losses are averaged
over the ranks (one all_reduce) before they are printed, so every rank must call `TrainMeter.line`.

On a terminal (stderr a tty, rank 0) the meter also keeps a live line up to date between the printed lines
(denseclip/progress.py's LiveLine): step/total, the running means of this rank's losses since the last printed
line, it/s and the ETA from the mean rate since the run (or its resume) started. It only reads numbers: the printed
lines, log.jsonl and piped output are the same with and without it."""
import json
import os
from pathlib import Path

from ..errors import MissingPackageError
from ..progress import LiveLine
from .distributed import print0, reduce_mean


def tensorboard_writer(log_dir: Path):
    """torch.utils.tensorboard's SummaryWriter, imported only when asked for: tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingPackageError("--tensorboard needs the tensorboard package: pip install tensorboard (or pip "
                                  "install 'denseclip[tensorboard]'); log.jsonl is written either way") from None
    return SummaryWriter(str(log_dir))


def drop_records_after(path: Path, step: int):
    """Remove the records of log.jsonl beyond iteration `step`: a run resumed at `step` does those steps again (after
    a SIGKILL its log ran ahead of its last checkpoint), and its curves must not run back. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("iter", 0) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        print0(f"{path}: dropped {len(lines) - len(kept)} record(s) after iteration {step}, the steps this run does "
               "again")


class RunLog:
    """log.jsonl (one JSON record a line, appended: a run resumed after iteration `after` continues it from there)
    and optional TensorBoard scalars, written by rank 0 only (`enabled`)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, after: int = 0):
        if enabled:
            drop_records_after(out_dir / "log.jsonl", after)
        self.file = open(out_dir / "log.jsonl", "a") if enabled else None
        self.writer = tensorboard_writer(out_dir / "tensorboard") if tensorboard and enabled else None

    def write(self, record: dict, group: str):
        """One record {"iter": ..., name: number, ...}; TensorBoard gets group/name against the iteration (group:
        'train' for losses, lr and speed; 'val' for the evaluation numbers)."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer:
            for k, v in record.items():
                if k != "iter":
                    self.writer.add_scalar(f"{group}/{k}", v, record["iter"])
            self.writer.flush()

    def close(self):
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


class TrainMeter:
    """Sums of each step's losses (and gradient norm) and the seconds spent in steps, since the last line; with
    `iters`, the live line of a run of `iters` steps that starts after `start` (drawn where `live` and a terminal)."""

    def __init__(self, iters: int = 0, start: int = 0, live: bool = False):
        self.live = LiveLine(iters, "train", start, on=live and iters > 0)
        self.reset()

    def reset(self):
        self.sums, self.steps, self.busy = {}, 0, 0.0

    def add(self, values: dict, seconds: float, step: int = 0):
        """One step's values (tensors or numbers); step: the steps done after it (for the live line)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps, self.busy = self.steps + 1, self.busy + seconds
        self.live.update(step, self.running)

    def running(self) -> str:
        """This rank's mean losses since the last line (total first), for the live line: no all_reduce, it is drawn
        on rank 0 alone. .item() waits for the GPU, which is why the live line asks only a few times a second."""
        avg = {k: float(v) / self.steps for k, v in self.sums.items() if k.startswith("loss")}
        parts = [f"loss {sum(avg.values()):.4f}"] + [f"{k[5:] or k} {v:.4f}" for k, v in avg.items()]
        return "  ".join(parts[:1] + (parts[1:] if len(avg) > 1 else []))

    def line(self, step: int, iters: int, epoch: int, lr: float, world: int):
        """(printed line, log record) of the means over the steps since the last line, over all ranks; resets."""
        self.live.clear()  # the printed line then starts at the left edge of a terminal
        avg = {k: v / self.steps for k, v in reduce_mean(self.sums, world).items()}
        avg["loss"] = sum(v for k, v in avg.items() if k.startswith("loss"))
        speed = self.steps / self.busy
        eta = (iters - step) / speed
        text = (f"iter {step}/{iters}  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items()) +
                f"  lr {lr:.3g}  {speed:.2f} it/s  eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                f"{int(eta % 60):02d}")
        self.reset()
        return text, {"iter": step, "epoch": epoch, **avg, "lr": lr, "it_per_s": speed, "eta_s": eta}
