"""Runs that die or are stopped: SIGKILL during a checkpoint write and between checkpoints, and SIGTERM / Ctrl-C
(SIGINT) in the middle of a segmentation and of a detection run, all resume (--resume auto) to parameters
bit-identical to an uninterrupted run; a signal saves a checkpoint at the next step boundary and ends the run with
one line and status 128 + the signal. In 2-process CPU DDP runs, a SIGTERM that reaches one rank stops both after
the same step, and one rank that raises ends both processes with a non-zero status, promptly, without a supervisor
(torchrun would also stop the rest)."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from denseclip.run.step import StopSignals  # noqa: E402

# Dropout on, 2 accumulation steps per iteration, a checkpoint every 2 of 4 iterations.
ARGS = ["--crop-size", "32", "--batch-size", "2", "--global-batch", "4", "--iters", "4", "--save-interval", "2",
        "--warmup-iters", "2", "--eval-interval", "0", "--val-size", "2", "--workers", "0", "--log-interval", "1",
        "--set", "test_mode=whole"]

# The same run of a detector (RetinaNet without language) on procedural images of 32 pixels, 8 a epoch.
DET_ARGS = ["--model", "retinanet_tiny", "--crop-size", "32", "--train-size", "8", "--batch-size", "2",
            "--global-batch", "4", "--iters", "4", "--save-interval", "2", "--warmup-iters", "2", "--eval-interval",
            "0", "--val-size", "2", "--workers", "0", "--log-interval", "1", "--set", "min_size=32", "--set",
            "max_size=64"]

# Run train.py in a child that SIGKILLs itself at a chosen point (what `kill -9` or the OOM killer does), or sends
# itself SIGTERM / SIGINT inside iteration 3 (what a scheduler or Ctrl-C does), as the command line runs it.
CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import train
    from denseclip.errors import run_main
    torch.set_num_threads(int(sys.argv[1]))  # as many as the uninterrupted run: float sums depend on it
    how, argv = sys.argv[2], sys.argv[3:]
    save, step, calls = torch.save, torch.optim.AdamW.step, []

    def save_then_die(obj, f, *a, **k):  # half of iter_000004.pt.tmp is on disk when the process dies
        save(obj, f, *a, **k)
        name = str(getattr(f, "name", f))  # save_checkpoint passes an open file
        if name.endswith("iter_000004.pt.tmp"):
            f.flush()
            os.truncate(name, os.path.getsize(name) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def step_then_die(self, *a, **k):  # dies (or is signalled) inside iteration 3: after checkpoint 2
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, how, signal.SIGKILL))
        return step(self, *a, **k)

    if how == "write":
        torch.save = save_then_die
    elif how != "none":
        torch.optim.AdamW.step = step_then_die
    run_main(lambda: train.main(argv))
""")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    train.main([*ARGS, "--out-dir", str(out)])
    return load(out / "iter_000004.pt")


@pytest.fixture(scope="module")
def uninterrupted_detector(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole_det")
    train.main([*DET_ARGS, "--out-dir", str(out)])
    return load(out / "iter_000004.pt")


def child(how: str, args: list, out: Path, threads=None):
    """The command line of train.py in a child process (CHILD) with `args`, SIGKILLed or signalled as `how` says."""
    return [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(threads or torch.get_num_threads()), how, *args,
            "--out-dir", str(out)]


@pytest.mark.parametrize("how,left", [("write", ["iter_000002.pt", "iter_000004.pt.tmp"]),
                                      ("between", ["iter_000002.pt"])])
def test_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path, how, left):
    out = tmp_path / "run"
    killed = subprocess.run(child(how, ARGS, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("iter_*")) == left  # the half-written file never replaced a good one
    resumes_bit_exactly(out, uninterrupted)


@pytest.mark.parametrize("task,how", [("segmentation", "SIGTERM"), ("segmentation", "SIGINT"),
                                      ("detection", "SIGTERM")])
def test_a_signal_saves_at_the_step_boundary_and_resumes_bit_exactly(request, tmp_path, task, how):
    """The signal arrives inside iteration 3 (checkpoints every 2): the run finishes that step, saves
    iter_000003.pt, says so in one line and exits with 128 + the signal; --resume auto then ends where an
    uninterrupted run ends."""
    args, reference = (ARGS, "uninterrupted") if task == "segmentation" else (DET_ARGS, "uninterrupted_detector")
    out = tmp_path / "run"
    stopped = subprocess.run(child(how, args, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    signum = getattr(signal, how)
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped: {how}{' (Ctrl-C)' if how == 'SIGINT' else ''} after iteration 3 of 4: saved {out}/iter_000003.pt; "
        "to continue, run the same command with --resume auto")
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_000002.pt", "iter_000003.pt"]
    assert load(out / "iter_000003.pt")["iter"] == 3  # at most the step the signal came in was at risk: none lost
    resumes_bit_exactly(out, request.getfixturevalue(reference), args)


def test_ctrl_c_twice_stops_at_once_but_one_ctrl_c_seen_twice_does_not():
    """Under torchrun a rank gets the terminal's SIGINT and torchrun's copy within milliseconds: that is one Ctrl-C.
    A second one, a second or more later, is the user insisting: KeyboardInterrupt (run_main: exit status 130)."""
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # noted already: the first signal is the one reported
        assert stop.received(1, torch.device("cpu")) == signal.SIGINT
        stop.since -= StopSignals.REPEAT_S  # as if a second had passed
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def resumes_bit_exactly(out: Path, reference: dict, args=ARGS):
    """--resume auto from what is left in `out` ends at the uninterrupted run's weights and optimiser state."""
    train.main([*args, "--out-dir", str(out), "--resume", "auto"])
    resumed = load(out / "iter_000004.pt")
    assert resumed["data"] == reference["data"]
    for k, v in reference["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    for i, state in reference["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(resumed["optimizer"]["state"][i][k], v), (i, k)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(commands, timeout=120):
    """Run one command per rank of a 2-process CPU DDP run started by hand (gloo on 127.0.0.1); (exit statuses,
    stderr of each). No process is left behind, whatever fails."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    start, procs = time.time(), []
    try:
        for rank, command in enumerate(commands):
            procs.append(subprocess.Popen(command, cwd=ROOT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        outputs = [p.communicate(timeout=max(1.0, timeout - (time.time() - start)))[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs], outputs


def test_a_sigterm_that_reaches_one_rank_stops_both_after_the_same_step(tmp_path):
    """torchrun passes a SIGTERM on to every rank, but not at the same instant; here only rank 1 gets it, inside
    iteration 3. The ranks agree at the step boundary (an all_reduce of the flag): both stop after iteration 3,
    rank 0 writes iter_000003.pt with both ranks' RNG states, and both end with the same line and status 143."""
    out = tmp_path / "run"
    args = [*ARGS, "--batch-size", "1", "--global-batch", "2"]
    codes, outputs = two_ranks([child("none", args, out, threads=1), child("SIGTERM", args, out, threads=1)])
    assert codes == [143, 143], (codes, outputs)
    for rank, err in enumerate(outputs):
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            f"[rank {rank}] stopped: SIGTERM after iteration 3 of 4: saved {out}/iter_000003.pt; to continue, run "
            "the same command with --resume auto"), err[-2000:]
    saved = load(out / "iter_000003.pt")
    assert saved["iter"] == 3 and len(saved["rng"]) == 2 and saved["data"] == {"epoch": 0, "seen": 6}


def test_one_rank_raises_and_both_exit_non_zero_within_60s(tmp_path):
    """Two ranks started by hand (no torchrun to stop the survivor). A training image with an intact header but cut
    pixels passes the quick pre-flight; the rank that draws it raises, the other finds its peer gone."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("training", 4), ("validation", 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / f"images/{split}/{i}.jpg")
            Image.fromarray(rng.integers(0, 4, (24, 32), dtype=np.uint8)).save(root / f"annotations/{split}/{i}.png")
    bad = root / "images/training/2.jpg"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: raw.index(b"\xff\xda") + 20])
    argv = ["--dataset", "folder", "--data-root", str(root), "--class-names", "sky,tree,road,car", "--crop-size", "32",
            "--scale", "48", "32", "--batch-size", "1", "--iters", "20", "--eval-interval", "0", "--workers", "0",
            "--out-dir", str(tmp_path / "run"), "--set", "test_mode=whole"]
    codes, outputs = two_ranks([[sys.executable, str(ROOT / "train.py"), *argv]] * 2, timeout=60)
    assert all(c is not None and c != 0 for c in codes), (codes, outputs)  # both ended, within the 60 s
    raised = [i for i, err in enumerate(outputs) if "cannot read image" in err and "2.jpg" in err]
    assert len(raised) == 1 and codes[raised[0]] == 2, outputs  # the rank that drew it: its message, status 2
    other = outputs[1 - raised[0]]
    assert "another process of this run failed" in other and "Traceback" not in other, other
