"""A one-line progress bar with rate and ETA for the loops a person waits on (evaluation, the demo over a folder,
dataset scans). Standard library only, so the file can be copied alone.

    for item in progress(items, "eval"):          # eval   37/200  18%  4.1 it/s  ETA 0:00:39
        ...

It writes to stderr and only when stderr is a terminal and this is rank 0 (torchrun's RANK): piped output, log
files and the other ranks stay clean. The line is redrawn in place (carriage return) at most ten times a second,
and always for the last item, so it ends at 100%. Like tqdm, without the dependency.

`LiveLine` is the same line for a loop that prints lines of its own (training: one per log interval): the caller
says when a step is done and what to show, and calls `clear` before printing, so a terminal that shows stdout and
stderr together gets the printed line on a line of its own.
"""
import os
import sys
import time

MIN_INTERVAL = 0.1  # seconds between redraws: a terminal needs no more than ~10 updates per second


def enabled(stream=None) -> bool:
    """True when progress should be shown: `stream` (default stderr) is a terminal and this is rank 0."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("RANK", "0") == "0"


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress(iterable, desc: str = "", total=None, stream=None):
    """Yield the items of `iterable` and, when `enabled`, draw `desc  done/total  pct  rate  ETA` on `stream`."""
    stream = stream if stream is not None else sys.stderr
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    if not enabled(stream):
        yield from iterable
        return
    start = last = time.monotonic()
    done = 0

    def draw(now):
        rate = done / max(now - start, 1e-9)
        if total:
            eta = (total - done) / rate if rate > 0 else 0.0
            text = f"{desc}  {done}/{total}  {100 * done // total:3d}%  {rate:.1f} it/s  ETA {format_eta(eta)}"
        else:
            text = f"{desc}  {done}  {rate:.1f} it/s  elapsed {format_eta(now - start)}"
        stream.write("\r" + text + "\x1b[K")  # \x1b[K: clear what a longer previous line left behind
        stream.flush()

    draw(start)
    try:
        for item in iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= MIN_INTERVAL or done == total:
                draw(now)
                last = now
    finally:
        if done != total:
            draw(time.monotonic())  # stopped early (or unknown total): show where it stopped
        stream.write("\n")
        stream.flush()


class LiveLine:
    """`desc  done/total  pct  extra  rate  ETA` redrawn in place on `stream` (default stderr) when `enabled`; the
    rate is the mean since the line was made (steps done then: `start`), so the ETA does not jump with one slow
    window. Nothing is written (and `extra` is never asked for) when it is not enabled."""

    def __init__(self, total: int, desc: str = "", start: int = 0, stream=None, on: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.on = on and enabled(self.stream)
        self.total, self.desc, self.start, self.t0 = total, desc, start, time.monotonic()
        self.last, self.shown = float("-inf"), False

    def due(self, done: int) -> bool:
        """Whether `update(done, ...)` would redraw: enabled, and the first step, the last, or MIN_INTERVAL on."""
        return self.on and (done in (self.start + 1, self.total) or time.monotonic() - self.last >= MIN_INTERVAL)

    def update(self, done: int, extra=lambda: ""):
        """Redraw for `done` steps of `total` when `due`; extra: a function giving the middle text (called only then,
        so that reading a value off a GPU happens a few times a second, not every step)."""
        if not self.due(done):
            return
        now = time.monotonic()
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        text = f"{self.desc}  {done}/{self.total}  {100 * done // max(self.total, 1):3d}%  {extra()}  " \
               f"{rate:.2f} it/s  ETA {format_eta(eta)}"
        self.stream.write("\r" + text + "\x1b[K")  # \x1b[K: clear what a longer previous line left behind
        self.stream.flush()
        self.last, self.shown = now, True

    def clear(self):
        """Wipe the line (before something else is printed to the same terminal); the next update redraws it."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown, self.last = False, float("-inf")

    def close(self):
        self.clear()
