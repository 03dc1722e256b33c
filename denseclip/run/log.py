"""What a training run writes down: the averaged losses of the last log interval as one printed line, and every
record (training and evaluation) in OUT_DIR/log.jsonl and, with --tensorboard, as TensorBoard scalars.

mmcv's TextLoggerHook and TensorboardLoggerHook in two small classes: only rank 0 writes; the losses are averaged
over the ranks (one all_reduce) before they are printed, so every rank must call `TrainMeter.line`."""
import json
from pathlib import Path

from .distributed import reduce_mean


def tensorboard_writer(log_dir: Path):
    """torch.utils.tensorboard's SummaryWriter, imported only when asked for: tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'denseclip[tensorboard]'); log.jsonl is written either way") from None
    return SummaryWriter(str(log_dir))


class RunLog:
    """log.jsonl (one JSON record a line, appended: a resumed run continues it) and optional TensorBoard scalars,
    written by rank 0 only (`enabled`)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
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
    """Sums of each step's losses (and gradient norm) and the seconds spent in steps, since the last line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.steps, self.busy = {}, 0, 0.0

    def add(self, values: dict, seconds: float):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps, self.busy = self.steps + 1, self.busy + seconds

    def line(self, step: int, iters: int, epoch: int, lr: float, world: int):
        """(printed line, log record) of the means over the steps since the last line, over all ranks; resets."""
        avg = {k: v / self.steps for k, v in reduce_mean(self.sums, world).items()}
        avg["loss"] = sum(v for k, v in avg.items() if k.startswith("loss"))
        speed = self.steps / self.busy
        eta = (iters - step) / speed
        text = (f"iter {step}/{iters}  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items()) +
                f"  lr {lr:.3g}  {speed:.2f} it/s  eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                f"{int(eta % 60):02d}")
        self.reset()
        return text, {"iter": step, "epoch": epoch, **avg, "lr": lr, "it_per_s": speed, "eta_s": eta}
