"""'The last good checkpoint' is good (issue 15, item 4): a checkpoint whose weights went NaN is never written, the
non-finite-loss stop names only a finite checkpoint, and a full disk says so, leaves no .tmp and keeps the previous
checkpoint, from which --resume auto continues bit-exactly."""
import errno
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_interrupted  # noqa: E402
from test_interrupted import ARGS, resumes_bit_exactly  # noqa: E402

import train  # noqa: E402  (repo root: on sys.path through test_interrupted)
from denseclip.errors import OutputError, TrainingError, run_main  # noqa: E402
from denseclip.run.step import stop_if_not_finite  # noqa: E402

uninterrupted = test_interrupted.uninterrupted  # the fixture: the same 4 iterations, never interrupted


def stopped(argv, capsys):
    """train.py as the command line runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_main(lambda: train.main(argv))
    return info.value.code, capsys.readouterr().err


def test_full_disk_says_so_leaves_no_tmp_and_resumes_bit_exactly(uninterrupted, tmp_path, monkeypatch, capsys):
    save = torch.save

    def disk_fills(obj, f, *a, **k):  # the second checkpoint: part of it reaches the disk, then ENOSPC
        if str(getattr(f, "name", f)).endswith("iter_000004.pt.tmp"):
            f.write(b"PK\x03\x04" + bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_fills)
    out = tmp_path / "run"
    with pytest.raises(OutputError) as info:  # also an OSError, for library callers
        train.main([*ARGS, "--out-dir", str(out)])
    msg = str(info.value)
    for words in ("cannot write checkpoint", "iter_000004.pt", "the disk is full", "4.0 KiB written", "free in",
                  f"{out / 'iter_000002.pt'} is untouched", "--resume auto"):
        assert words in msg, (words, msg)
    assert isinstance(info.value, OSError)
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_000002.pt"]  # no .tmp, the previous one kept
    monkeypatch.setattr(torch, "save", save)
    resumes_bit_exactly(out, uninterrupted)


def test_other_write_errors_name_the_cause_at_the_command_line(tmp_path, monkeypatch, capsys):
    def read_only(obj, f, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(torch, "save", read_only)
    out = tmp_path / "run"
    code, err = stopped([*ARGS, "--iters", "1", "--out-dir", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: cannot write checkpoint") and "Read-only file system" in err, err
    assert "no earlier checkpoint exists" in err and not list(out.glob("iter_*")), err


def test_non_finite_weight_is_not_saved_and_the_last_good_one_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    step, calls = torch.optim.AdamW.step, []

    def nan_after_fourth_update(self, *a, **k):  # the loss of step 4 was finite; its update breaks one weight
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_after_fourth_update)
    out = tmp_path / "run"
    code, err = stopped([*ARGS, "--out-dir", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err
    for words in ("non-finite weights after iteration 4", "1 tensor(s)", "iter_000004.pt was not written",
                  f"{out / 'iter_000002.pt'} is the last good checkpoint", "--lr"):
        assert words in err, (words, err)
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_000002.pt"]
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    resumes_bit_exactly(out, uninterrupted)


def test_nan_loss_names_the_newest_finite_checkpoint(tmp_path):
    """A NaN loss after a checkpoint whose weights were already non-finite (one from elsewhere or an older version:
    save_run writes no such file) names the one before it, and --resume of the bad one is refused."""
    good = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    bad = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("nan")])}}}}
    torch.save(good, tmp_path / "iter_000002.pt")
    torch.save(bad, tmp_path / "iter_000004.pt")
    nan = {"loss_decode": torch.tensor(float("nan"))}
    with pytest.raises(TrainingError) as info:
        stop_if_not_finite(nan, 5, 1, tmp_path)
    msg = str(info.value)
    assert "non-finite loss at iteration 5" in msg and f"{tmp_path / 'iter_000002.pt'} is the last good" in msg, msg
    assert "iter_000004.pt: non-finite or unreadable" in msg, msg
    (tmp_path / "iter_000002.pt").unlink()
    with pytest.raises(TrainingError, match="no good checkpoint was written yet"):
        stop_if_not_finite(nan, 5, 1, tmp_path)


def test_resume_of_a_non_finite_checkpoint_is_refused(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    broken = {**uninterrupted, "model": {k: v.clone() for k, v in uninterrupted["model"].items()}}
    next(v for v in broken["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(uninterrupted, out / "iter_000002.pt")  # finite (its iteration number does not matter here)
    torch.save(broken, out / "iter_000004.pt")
    code, err = stopped([*ARGS, "--iters", "6", "--out-dir", str(out), "--resume", "auto"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "iter_000004.pt holds non-finite weights" in err and f"--resume {out / 'iter_000002.pt'}" in err, err
