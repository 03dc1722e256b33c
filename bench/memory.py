"""Resident memory of a real training run over a few hundred steps: does it grow?

    python bench/memory.py [--iters 300] [--model denseclip_tiny] [-- extra train.py options]

Runs `train.py` (procedural data, CPU, no evaluation until the end, one checkpoint at the end) in a child process
and samples its resident set size (VmRSS in /proc/PID/status) every 0.1 s, matching the samples to the step each
log line reports. A leak (say, tensors with their graph kept in a list, or a cache that never stops growing) shows
as RSS rising with the steps; flat growth after warm-up is what we want. Linux only (/proc).
"""
import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--model", default="denseclip_tiny")
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("extra", nargs="*", help="more train.py options (after --)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--iters", str(args.iters),
               "--crop-size", str(args.crop_size), "--batch-size", "2", "--eval-interval", "0", "--val-size", "2",
               "--workers", "0",
               "--log-interval", str(args.log_interval), "--save-interval", "0", "--out-dir", out, *args.extra]
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        steps, samples = [], []  # (time, step), (time, MiB)

        def read_log():
            for line in child.stdout:
                m = re.match(r"iter (\d+)/", line)
                if m:
                    steps.append((time.time(), int(m.group(1))))

        reader = threading.Thread(target=read_log)
        reader.start()
        while child.poll() is None:
            try:
                samples.append((time.time(), rss_mib(child.pid)))
            except (FileNotFoundError, StopIteration, ProcessLookupError):  # exiting: no memory map any more
                break
            time.sleep(0.1)
        child.wait()
        reader.join()
    if child.returncode != 0:
        raise SystemExit(f"train.py failed with status {child.returncode}")
    rows = []
    for t, step in steps:
        before = [mib for ts, mib in samples if ts <= t]
        if before:
            rows.append((step, before[-1]))
    print(f"{args.model}, crop {args.crop_size}, batch 2, {args.iters} steps; resident memory (MiB) at the log line "
          "of each step:")
    print("  " + "  ".join(f"{step}: {mib:.0f}" for step, mib in rows))
    first = next((r for r in rows if r[0] >= args.iters // 5), rows[0])  # after warm-up (allocator, lazy imports)
    growth = rows[-1][1] - first[1]
    peak = max(mib for _, mib in samples)
    print(f"growth from step {first[0]} to {rows[-1][0]}: {growth:+.1f} MiB "
          f"({100 * growth / (rows[-1][0] - first[0]):+.2f} MiB per 100 steps); peak {peak:.0f} MiB")
    return rows


if __name__ == "__main__":
    main()
