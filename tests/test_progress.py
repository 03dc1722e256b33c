"""The progress line: drawn on a terminal (a real pseudo-terminal here), silent when piped and on ranks other
than 0, and `eval.py` shows it reaching 100% with an ETA."""
import io
import os
import pty
import sys
import threading
from pathlib import Path

import torch

from denseclip.data.procedural import SHAPE_CLASSES
from denseclip.progress import format_eta, progress
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
