"""The progress line: drawn on a terminal (a real pseudo-terminal here), silent when piped and on ranks other
than 0, and `eval.py` shows it reaching 100% with an ETA; `train.py` draws its live line (losses, it/s, ETA from
the mean rate) on a terminal's stderr while its stdout lines and log.jsonl stay as they are."""
import io
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import torch

from denseclip.data.procedural import SHAPE_CLASSES
from denseclip import progress as progress_module
from denseclip.progress import LiveLine, format_eta, progress
from denseclip import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402


class Terminal:
    """A pseudo-terminal: `.file` is its slave end (isatty() is True), `.read()` what was written to it so far."""

    def __init__(self):
        self.master, slave = pty.openpty()
        self.file = os.fdopen(slave, "w")
        self.chunks = []
        self.reader = threading.Thread(target=self._drain, daemon=True)  # a full pty buffer would block writers
        self.reader.start()

    def _drain(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the slave end was closed
                return
            if not data:
                return
            self.chunks.append(data)

    def read(self):
        self.file.close()
        self.reader.join(timeout=5)
        os.close(self.master)
        return b"".join(self.chunks).decode()


def test_progress_on_a_terminal_reaches_100_percent_with_eta(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    term = Terminal()
    assert term.file.isatty()
    assert list(progress(range(7), "scan", stream=term.file)) == list(range(7))
    text = term.read()
    assert "scan  0/7    0%" in text and "scan  7/7  100%" in text and "ETA 0:00:00" in text
    assert text.endswith("\n") and "\r" in text  # redrawn in place, one final newline


def test_progress_is_silent_when_piped_and_off_rank_zero(monkeypatch):
    piped = io.StringIO()  # isatty() is False, like a pipe or a log file
    assert list(progress(iter(range(3)), "x", total=3, stream=piped)) == [0, 1, 2]
    assert piped.getvalue() == ""
    monkeypatch.setenv("RANK", "1")
    term = Terminal()
    list(progress(range(3), "x", stream=term.file))
    assert term.read() == ""
    assert format_eta(3725) == "1:02:05"


def test_eval_prints_progress_on_a_terminal_and_none_when_piped(tmp_path, monkeypatch, capfd):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": build_model("denseclip_tiny", SHAPE_CLASSES).state_dict()}, ckpt)
    argv = [str(ckpt), "--model", "denseclip_tiny", "--val-size", "3", "--crop-size", "64", "--workers", "0"]
    monkeypatch.delenv("RANK", raising=False)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term.file)
    evaluation.main(argv)
    text = term.read()
    assert "eval  3/3  100%" in text and "ETA" in text, text
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    capfd.readouterr()
    evaluation.main(argv)  # stderr captured by pytest: not a terminal
    captured = capfd.readouterr()
    assert "ETA" not in captured.err and "%" not in captured.err and "mIoU" in captured.out


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_live_line_rate_is_the_mean_since_the_start(monkeypatch):
    clock = iter([0.0, 1.0, 1.05, 12.0, 12.0])  # made at 0; step 1 at 1 s, step 2 50 ms later, step 3 at 12 s
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock, 99.0))
    monkeypatch.delenv("RANK", raising=False)
    stream = TTY()
    line = LiveLine(10, "train", start=0, stream=stream)
    line.update(1, lambda: "loss 0.5000")  # the first step always draws: 1 step in 1 s
    line.update(2, lambda: 1 / 0)  # under MIN_INTERVAL after the last draw: not drawn, `extra` not called
    line.update(3, lambda: "loss 0.2500")
    text = stream.getvalue()
    assert "train  1/10   10%  loss 0.5000  1.00 it/s  ETA 0:00:09" in text
    assert "train  3/10   30%  loss 0.2500  0.25 it/s  ETA 0:00:28" in text  # 3 steps in 12 s, not the last window
    line.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
    piped = LiveLine(10, "train", stream=io.StringIO())
    piped.update(1, lambda: 1 / 0)  # not a terminal: nothing drawn, nothing asked
    assert piped.stream.getvalue() == ""


def test_train_draws_a_live_line_on_a_terminal_and_keeps_stdout_plain(tmp_path):
    """A short real run with stderr on a pseudo-terminal and stdout piped."""
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", "--iters", "6", "--log-interval", "3", "--eval-interval", "0", "--val-size",
            "2", "--train-size", "48", "--batch-size", "2", "--crop-size", "32", "--scale", "48", "32", "--workers",
            "0", "--set", "test_mode=whole", "--out-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    env["PYTHONPATH"] = str(ROOT)
    term = Terminal()
    run = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=term.file, text=True, timeout=300)
    screen = term.read()
    assert run.returncode == 0, screen
    assert "train  1/6   16%  loss " in screen and "train  6/6  100%  loss " in screen and "it/s  ETA" in screen
    assert "\r" in screen and "\x1b[K" in screen  # redrawn in place
    assert "\r" not in run.stdout and "\x1b" not in run.stdout and "train  1/6" not in run.stdout
    printed = [line for line in run.stdout.splitlines() if line.startswith("iter ") and "it/s  eta" in line]
    records = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [line.split()[1] for line in printed] == ["3/6", "6/6"]
    assert [r["iter"] for r in records if "lr" in r] == [3, 6]
