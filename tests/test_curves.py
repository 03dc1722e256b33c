"""Training curves: `train.py --tensorboard` logs the numbers of log.jsonl, a clear message without tensorboard,
and tools/plot_log.py draws log.jsonl as a PNG."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import plot_log  # noqa: E402
import train  # noqa: E402
from denseclip.run.log import tensorboard_writer  # noqa: E402


def test_tensorboard_logs_what_log_jsonl_says_and_plot_log_draws_it(tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, "--iters", "2", "--val-size", "2", "--out-dir", str(out), "--tensorboard"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"train/loss", "train/loss_decode", "train/loss_aux", "train/lr", "train/it_per_s",
            "val/mIoU"} <= set(events.Tags()["scalars"])
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["iter"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
    assert events.Scalars("val/mIoU")[-1].value == pytest.approx(records[-1]["mIoU"], rel=1e-6)

    png = plot_log.main([str(out)])
    assert png == out / "curves.png"
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape == (2 * plot_log.PANEL_H, 2 * plot_log.PANEL_W, 3)
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):  # every panel has something in its first colour
        panel = im[row * plot_log.PANEL_H:(row + 1) * plot_log.PANEL_H, col * plot_log.PANEL_W:(col + 1) *
                   plot_log.PANEL_W]
        assert (panel == plot_log.COLOURS[0]).all(-1).sum() > 10, (row, col)


def test_tensorboard_missing_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):  # MissingPackageError: exit 2
        tensorboard_writer(tmp_path)
