"""Scale-out as people run it: two torchrun launchers on one machine stand for two nodes (--nnodes 2
--nproc_per_node 1, a c10d rendezvous on 127.0.0.1, or the static --node_rank / --master_addr form) and train to
the state dict one launcher with two processes trains, bit for bit; each resumes bit-exactly from the other's
checkpoints; nodes that would resume from different checkpoints (an --out-dir they do not share) are refused; and a
rank SIGKILLed on one node ends the other node's rank within seconds, with one line and no traceback of ours.

CPU processes and gloo throughout; docs/speed.md#more-than-one-machine documents the commands."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_interrupted import CHILD, two_ranks  # noqa: E402
from test_train import free_port, load  # noqa: E402

# 4 steps of 2 ranks x 1 image, a checkpoint every 2; dropout on (each rank draws its own, resumed exactly).
ARGS = ["--model", "denseclip_tiny", "--crop-size", "32", "--scale", "48", "32", "--batch-size", "1", "--iters", "4",
        "--save-interval", "2", "--warmup-iters", "2", "--eval-interval", "0", "--val-size", "2", "--train-size", "8",
        "--workers", "0", "--log-interval", "1", "--set", "test_mode=whole"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def one_launcher():
    return [[*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]]


def two_launchers(form="c10d"):
    """One torchrun command per node, as each node runs it (all but --node_rank the same on every node)."""
    common = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1"]
    if form == "c10d":  # torchrun numbers the nodes itself: no --node_rank
        return [[*common, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id",
                 "test"]] * 2
    port = str(free_port())
    return [[*common, "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port]
            for node in range(2)]


def launch(launchers, scripts, logs: Path, timeout=240):
    """Start every launcher with its script and arguments; (exit statuses, stderr of each, seconds from the start to
    each launcher's end). Every process of every launcher is killed if one outlives the timeout or the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun sets it only for more than one process per node
    logs.mkdir(parents=True, exist_ok=True)
    procs, start, ends = [], time.monotonic(), {}
    try:
        for i, (launcher, script) in enumerate(zip(launchers, scripts)):
            with open(logs / f"{i}.err", "w") as err:  # a file, not a pipe: nobody reads while it runs
                procs.append(subprocess.Popen([*launcher, *script], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                              stderr=err, start_new_session=True))
        while len(ends) < len(procs):
            assert time.monotonic() - start < timeout, f"still running after {timeout} s"
            ends.update({i: time.monotonic() - start for i, p in enumerate(procs)
                         if i not in ends and p.poll() is not None})
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and its ranks (its session)
                p.wait()
    errs = [(logs / f"{i}.err").read_text() for i in range(len(procs))]
    return [p.returncode for p in procs], errs, [ends[i] for i in range(len(procs))]


def train(launchers, out: Path, *extra):
    codes, errs, _ = launch(launchers, [[str(ROOT / "train.py"), *ARGS, *extra, "--out-dir", str(out)]] *
                            len(launchers), out.parent / f"{out.name}_logs")
    assert codes == [0] * len(launchers), [e[-3000:] for e in errs]
    return load(out / "iter_000004.pt")


def assert_same_run(a: dict, b: dict):
    """Bit-identical weights, buffers, optimiser state, data position and every rank's RNG state."""
    assert a["iter"] == b["iter"] and a["data"] == b["data"] and len(a["rng"]) == len(b["rng"]) == 2
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    for x, y in zip(a["rng"], b["rng"]):
        assert torch.equal(x["torch"], y["torch"])


def resume_from(checkpoint: Path, launchers, outs: list):
    """--resume auto in fresh folders (one per node, or one for all) holding only `checkpoint`, as if the run had
    stopped there; the final checkpoint (rank 0's node writes it: the first folder)."""
    for out in outs:
        out.mkdir()
        shutil.copy(checkpoint, out)
    scripts = [[str(ROOT / "train.py"), *ARGS, "--resume", "auto", "--out-dir", str(out)] for out in outs]
    codes, errs, _ = launch(launchers, scripts * (len(launchers) // len(outs)), outs[0].parent / "logs")
    assert codes == [0] * len(launchers), [e[-3000:] for e in errs]
    return load(outs[0] / "iter_000004.pt")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: one launcher, two processes."""
    return train(one_launcher(), tmp_path_factory.mktemp("one") / "run")


def test_two_nodes_train_and_resume_as_one_node_with_two_processes(one_node, tmp_path):
    """Two launchers x 1 process == one launcher x 2 processes, bit for bit (the same ranks, samples and
    all-reduces: only the launch differs); and each continues the other's run from its step-2 checkpoint."""
    two = train(two_launchers("c10d"), tmp_path / "two")  # both nodes write into one --out-dir: a shared folder
    assert_same_run(one_node, two)
    assert_same_run(one_node, resume_from(tmp_path / "two" / "iter_000002.pt", one_launcher(), [tmp_path / "one"]))
    # a folder per node, the checkpoint copied to each; only rank 0 (node 0 in the static form) writes
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    assert_same_run(one_node, resume_from(one_node_dir(one_node) / "iter_000002.pt", two_launchers("static"), nodes))
    assert sorted(p.name for p in nodes[1].iterdir()) == ["iter_000002.pt"]


def one_node_dir(reference: dict) -> Path:
    return Path(reference["args"]["out_dir"])


def test_nodes_that_see_different_checkpoints_are_refused(one_node, tmp_path):
    """An --out-dir the nodes do not share: rank 0's node holds the checkpoint, the other node nothing. Unchecked,
    --resume auto started that node from scratch, out of step with rank 0 (and the job hung at the end)."""
    first, second = tmp_path / "node0", tmp_path / "node1"
    first.mkdir()
    shutil.copy(one_node_dir(one_node) / "iter_000002.pt", first)
    codes, errs = two_ranks([[sys.executable, str(ROOT / "train.py"), *ARGS, "--resume", "auto", "--out-dir",
                              str(out)] for out in (first, second)])
    assert codes == [2, 2], errs
    for rank, err in enumerate(errs):
        assert err.strip().splitlines()[-1] == (
            f"[rank {rank}] error: the ranks would continue from different points (rank 0: {first}/iter_000002.pt "
            "(iteration 2); rank 1: no checkpoint): every node must see the same checkpoints, so give --out-dir a "
            "folder the nodes share, or copy the newest iter_*.pt into --out-dir on every node"), err[-2000:]
    assert [p.name for p in first.iterdir()] == ["iter_000002.pt"] and not second.exists()


def test_a_rank_killed_on_one_node_ends_the_other_within_seconds(tmp_path):
    """SIGKILL (the OOM killer, a machine that dies) of the rank on the second node inside its third step: the
    first node's rank finds its peer gone at the next collective and ends with one line of ours; the only
    traceback is torchrun's own (ChildFailedError, from torch's files)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    codes, errs, ends = launch(two_launchers("c10d"), [[str(script), "1", how, *ARGS, "--out-dir", str(tmp_path)]
                                                       for how in ("none", "SIGKILL")], tmp_path / "logs")
    assert codes == [1, 1], errs
    assert "exitcode  : -9" in errs[1] and "(SIGKILL)" in errs[1]  # torchrun's report on the second node
    ours = [line for line in errs[0].splitlines() if "stopped:" in line or "error:" in line]
    assert len(ours) == 1 and ours[0].endswith(
        "stopped: another process of this run failed or was killed (its own output, on its machine, says why)"), errs[0]
    frames = [line for line in errs[0].splitlines() if line.lstrip().startswith("File ")]
    assert frames and all("<frozen runpy>" in f or f"{os.sep}torch{os.sep}" in f for f in frames), frames
    print(f"the first node's launcher ended {ends[0] - ends[1]:.1f} s after the second's")
    assert ends[0] - ends[1] < 30, ends
