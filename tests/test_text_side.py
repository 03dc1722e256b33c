"""bench/text_side.py (issue 17's "why it stays level"): on a real train.py checkpoint, its decode-head mIoU is the
run's own final evaluation, its cosines are those of the model's class embeddings, a confusion row is in % of its
true class's pixels, and a checkpoint without a text side is refused."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import text_side  # noqa: E402
import train  # noqa: E402
from denseclip import language  # noqa: E402
from denseclip.errors import ConfigError  # noqa: E402
from denseclip.run.checkpoints import model_from_checkpoint  # noqa: E402

RUN = ["--iters", "3", "--batch-size", "2", "--train-size", "8", "--val-size", "4", "--eval-interval", "0",
       "--crop-size", "32", "--set", "test_mode=whole", "--workers", "0"]


def test_numbers_match_the_run_and_the_model(tmp_path, capsys):
    train.main(["--model", "denseclip_tiny", *RUN, "--out-dir", str(tmp_path)])
    ckpt = tmp_path / "iter_000003.pt"
    final = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    res = text_side.inspect(str(ckpt), val_size=4, batch=3, close=0.5)  # batch 3: a partial last batch too
    out = capsys.readouterr().out
    assert "(4 val images of 32 pixels)" in out
    assert res["head"]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-9)  # the same images, the same prediction
    model = model_from_checkpoint(str(ckpt))[0]
    with torch.no_grad():
        t = F.normalize(language.class_text_features(model)[0].double(), dim=-1)
    torch.testing.assert_close(res["cos"], t @ t.T)
    assert f"mean {(t @ t.T)[~torch.eye(8, dtype=torch.bool)].mean():.3f}" in out
    for cm in (res["score"], res["head"]):
        assert 0.0 <= cm["mIoU"] <= 1.0


def test_percent_rows_and_refuses_a_baseline(tmp_path):
    rows = text_side.percent_rows(torch.tensor([[3, 1], [0, 0]]))
    assert rows.tolist() == [[75.0, 25.0], [0.0, 0.0]]  # an absent class: zeros, not NaN
    train.main(["--model", "fpn_tiny", *RUN, "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not a segmentor with a text side"):
        text_side.inspect(str(tmp_path / "iter_000003.pt"), val_size=2, batch=2, close=0.9)
