"""Runs that die: SIGKILL during a checkpoint write and between checkpoints both resume (--resume auto) to parameters
bit-identical to an uninterrupted run; in a 2-process CPU DDP run one rank that raises ends both processes with a
non-zero status, promptly, without a supervisor (torchrun would also stop the rest)."""
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

# Dropout on, 2 accumulation steps per iteration, a checkpoint every 2 of 4 iterations.
ARGS = ["--crop-size", "32", "--batch-size", "2", "--global-batch", "4", "--iters", "4", "--save-interval", "2",
        "--warmup-iters", "2", "--eval-interval", "0", "--val-size", "2", "--workers", "0", "--log-interval", "1",
        "--set", "test_mode=whole"]

# Run train.py in a child that SIGKILLs itself at a chosen point (what `kill -9` or the OOM killer does).
CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import train
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

    def step_then_die(self, *a, **k):  # dies inside iteration 3: after checkpoint 2, before checkpoint 4
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)

    if how == "write":
        torch.save = save_then_die
    else:
        torch.optim.AdamW.step = step_then_die
    train.main(argv)
""")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    train.main([*ARGS, "--out-dir", str(out)])
    return load(out / "iter_000004.pt")


@pytest.mark.parametrize("how,left", [("write", ["iter_000002.pt", "iter_000004.pt.tmp"]),
                                      ("between", ["iter_000002.pt"])])
def test_sigkill_then_resume_is_bit_exact(uninterrupted, tmp_path, how, left):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(torch.get_num_threads()), how,
                            *ARGS, "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert sorted(p.name for p in out.glob("iter_*")) == left  # the half-written file never replaced a good one
    resumes_bit_exactly(out, uninterrupted)


def resumes_bit_exactly(out: Path, reference: dict):
    """--resume auto from what is left in `out` ends at the uninterrupted run's weights and optimiser state."""
    train.main([*ARGS, "--out-dir", str(out), "--resume", "auto"])
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
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    start, procs = time.time(), []
    try:
        for rank in (0, 1):
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT,
                                          env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        outputs = [p.communicate(timeout=max(1.0, 60 - (time.time() - start)))[1] for p in procs]
        elapsed = time.time() - start
    finally:
        for p in procs:  # never leave a process behind, whatever failed above
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    codes = [p.returncode for p in procs]
    assert elapsed < 60 and all(c != 0 for c in codes), (codes, elapsed, outputs)
    raised = [i for i, err in enumerate(outputs) if "cannot read image" in err and "2.jpg" in err]
    assert len(raised) == 1 and codes[raised[0]] == 2, outputs  # the rank that drew it: its message, status 2
    other = outputs[1 - raised[0]]
    assert "another process of this run failed" in other and "Traceback" not in other, other
