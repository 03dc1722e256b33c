"""Training curves: `train.py --tensorboard` logs the numbers of log.jsonl, a clear message without tensorboard,
and tools/plot_log.py draws log.jsonl with matplotlib (issue 19): losses, lr, validation metric and speed against
the iteration, axis labels, one colour per run, a single evaluation as a visible marker, a clear message without
matplotlib. What is drawn is checked on the figure plot_log returns, not on pixels."""
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
from denseclip.errors import run_main  # noqa: E402
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

    png, fig = plot_log.main([str(out)])  # one evaluation, at the last iteration
    assert png == out / "curves.png" and Image.open(png).size == (1100, 750)
    loss, lr, val, speed = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == ["iteration"] * 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning rate", "mIoU (%)", "iterations / s"]
    assert [line.get_label() for line in loss.lines] == ["loss", "loss_decode", "loss_aux"]
    (point,) = val.lines
    assert list(point.get_xdata()) == [2] and point.get_ydata()[0] == pytest.approx(100 * records[-1]["mIoU"])
    assert point.get_marker() == "o" and point.get_markersize() >= 5  # one evaluation: a visible point
    logged = [r["iter"] for r in records if "lr" in r]
    assert [line.get_xdata().tolist() for line in lr.lines + speed.lines] == [logged, logged]


def synthetic_log(path: Path, scale: float, evals=range(200, 1001, 200)):
    """A 1000-iteration log: a line every 50 iterations, an evaluation every 200."""
    path.mkdir(parents=True)
    records = [{"iter": i, "loss": scale / i, "loss_decode": 0.7 * scale / i, "loss_aux": 0.3 * scale / i,
                "lr": 1e-4 * (1 - i / 1000), "it_per_s": 4.0} for i in range(50, 1001, 50)]
    records += [{"iter": i, "mIoU": 0.3 * i / 1000, "mAcc": 0.4} for i in evals]
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["iter"])))


def test_plot_log_compares_runs_one_colour_each(tmp_path):
    synthetic_log(tmp_path / "a" / "demo", 1.0)
    synthetic_log(tmp_path / "b" / "demo", 2.0)
    synthetic_log(tmp_path / "det", 3.0, evals=[])
    png, fig = plot_log.main([str(tmp_path / "a" / "demo"), str(tmp_path / "b" / "demo"), str(tmp_path / "det"),
                              "--out", str(tmp_path / "cmp.png")])
    assert png.is_file() and Image.open(png).format == "PNG"
    loss, lr, val, speed = fig.axes
    assert [line.get_label() for line in lr.lines] == ["a/demo", "b/demo", "det"]  # same names: the parent tells
    for i, name in enumerate(["a/demo", "b/demo", "det"]):  # a run's colour is the same in every panel
        colour = lr.lines[i].get_color()
        assert speed.lines[i].get_color() == colour
        assert {line.get_color() for line in loss.lines if line.get_label().startswith(name + ":")} == {colour}
    assert len({line.get_color() for line in lr.lines}) == 3
    assert [line.get_label() for line in val.lines] == ["a/demo: mIoU", "b/demo: mIoU"]  # det evaluated never
    assert val.lines[0].get_xdata().tolist() == [200, 400, 600, 800, 1000]
    assert all(line.get_marker() == "o" for line in val.lines)
    assert [ax.get_legend() is not None for ax in fig.axes] == [True] * 4
    for ax in (loss, val):  # round ticks: whole iterations, 1, 2 or 5 x 10^k apart
        ticks = ax.get_xticks()
        step = ticks[1] - ticks[0]
        assert all(t == round(t) for t in ticks) and step / 10 ** np.floor(np.log10(step)) in (1, 2, 5)


def test_plot_log_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    synthetic_log(tmp_path / "run", 1.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: plot_log.main([str(tmp_path / "run")]))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'pip install -e ".[plot]"' in err
    assert not (tmp_path / "run" / "curves.png").exists()


def test_tensorboard_missing_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):  # MissingPackageError: exit 2
        tensorboard_writer(tmp_path)
