"""bench/seeds.py, the seed table of issue 17: it trains what it is asked for, reads back finished runs instead of
rerunning them, and its table and comparison line are computed from the per-seed numbers."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seeds  # noqa: E402

TINY_RUN = ["--iters", "2", "--batch-size", "2", "--train-size", "8", "--val-size", "2", "--eval-interval", "0",
            "--crop-size", "32", "--set", "test_mode=whole", "--workers", "0"]


def test_runs_then_reads_back(tmp_path, capsys):
    argv = ["--models", "fpn_tiny", "--seeds", "3", "--jobs", "1", "--out-dir", str(tmp_path), "--", *TINY_RUN]
    seeds.main(argv)
    first = capsys.readouterr().out
    log = tmp_path / "fpn_tiny_seed3" / "log.jsonl"
    final = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert final["iter"] == 2 and f"mIoU {100 * final['mIoU']:.2f} in" in first
    seeds.main(argv)  # the finished run is read, not retrained
    again = capsys.readouterr().out
    assert "(read from its folder)" in again and log.read_text().count('"mIoU"') == 1
    row = next(line for line in again.splitlines() if line.startswith("| `fpn_tiny`"))
    assert f"| {100 * final['mIoU']:.2f} ± 0.00 | {100 * final['mIoU']:.2f} |" in row


def test_table_statistics_and_comparison():
    results = {("a", 0): {"numbers": {"mIoU": 40.0}, "wall_s": 300.0},
               ("a", 1): {"numbers": {"mIoU": 30.0}, "wall_s": 310.0},
               ("b", 0): {"numbers": {"mIoU": 35.0}, "wall_s": 200.0},
               ("b", 1): {"numbers": {"mIoU": 32.0}, "wall_s": None}}
    text = seeds.table(["a", "b"], [0, 1], results)
    assert "| `a` | mIoU | 40.00 | 30.00 | 35.00 ± 7.07 | 30.00 | 305 s |" in text
    assert "| `b` | mIoU | 35.00 | 32.00 | 33.50 ± 2.12 | 32.00 | 200 s |" in text
    assert "`a` ahead of `b` (mIoU) at 1 of 2 seeds (not at seed 1)" in text


def test_unfinished_log_is_not_a_result(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"iter": 10, "loss": 1.0}) + "\n" + json.dumps({"iter": 5, "mIoU": 0.2}) + "\n")
    assert seeds.final_numbers(log) is None  # the last evaluation is older than the last step
    log.write_text(log.read_text() + json.dumps({"iter": 10, "mIoU": 0.25}) + "\n")
    assert seeds.final_numbers(log) == {"mIoU": 25.0}
