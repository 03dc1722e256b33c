"""CPU thread settings, quiet and under a competing load: wall time of a short `python train.py` and of `eval.py`
on its checkpoint, per OpenMP setting, with and without other busy processes on the same cores.

    python bench/threads.py                      # 40 train iterations + eval of 200 images, load 0 and 2 (~6 min)
    python bench/threads.py --loads 0 --rounds 1

Settings: `spin` (`--threads 0`: torch's threads = the cores, the default before issue 18; waiting threads spin:
GOMP_SPINCOUNT=300000, libgomp's default when nothing is set), `spin30k` (a tenth of that spinning), `passive`
(OMP_WAIT_POLICY=PASSIVE: waiting threads sleep), `one` (OMP_NUM_THREADS=1) and `shipped` (nothing set: the recipe's
--threads, 1 for the procedural runs; docs/troubleshooting.md). The competing load: N processes, each a Python busy
loop (one core each), started before and stopped after each timing. Settings are timed in turn within a round, so a
change in the machine's other load hits all of them; the table gives each round and the median.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setting -> (environment, train.py / eval.py options); "--threads 0": torch's default thread count (the cores)
SETTINGS = {"spin": ({"GOMP_SPINCOUNT": "300000"}, ["--threads", "0"]),
            "spin30k": ({"GOMP_SPINCOUNT": "30000"}, ["--threads", "0"]),
            "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "0"]),
            "one": ({"OMP_NUM_THREADS": "1"}, []), "shipped": ({}, [])}


def run(cmd, env_extra, log):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                             "MKL_NUM_THREADS")}
    env.update(env_extra)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def busy(n):
    """n processes spinning on one core each (the other jobs of a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=40, help="train iterations per timing")
    p.add_argument("--val-size", type=int, default=200, help="validation images of the eval timing")
    p.add_argument("--loads", type=int, nargs="+", default=[0, 2], help="competing busy processes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="threads_"))
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for load in args.loads:
        for r in range(args.rounds):
            for name in args.settings:
                out = tmp / f"{name}_{load}_{r}"
                procs = busy(load)
                try:
                    la = os.getloadavg()[0]
                    env, extra = SETTINGS[name]
                    t_train = run([sys.executable, "train.py", "--iters", str(args.iters), "--eval-interval", "0",
                                   "--save-interval", str(args.iters), "--out-dir", str(out), *extra], env,
                                  tmp / f"{out.name}_train.log")
                    t_eval = run([sys.executable, "eval.py", str(out / f"iter_{args.iters:06d}.pt"), "--val-size",
                                  str(args.val_size), *extra], env, tmp / f"{out.name}_eval.log")
                finally:
                    for q in procs:
                        q.kill()
                results.setdefault((load, name), []).append((t_train, t_eval))
                print(f"load {load} round {r + 1} {name:8s} train {t_train:7.1f} s  eval {t_eval:7.1f} s  "
                      f"(load average {la:.2f})", flush=True)
    print(f"\n{'competing load':>14s} {'setting':10s} {'train s':>9s} {'eval s':>8s}  (median of {args.rounds})")
    for (load, name), ts in results.items():
        med = [sorted(t[i] for t in ts)[len(ts) // 2] for i in (0, 1)]
        print(f"{load:14d} {name:10s} {med[0]:9.1f} {med[1]:8.1f}")
    return results


if __name__ == "__main__":
    main()
