"""The seed table: the short recipes run over several seeds, reported as a user meets them (mean ± std, min).

    python bench/seeds.py                                   # denseclip_tiny vs fpn_tiny, seeds 0-4, 2 runs at a time
    python bench/seeds.py --models retinanet_denseclip_tiny retinanet_tiny --seeds 0 1 2
    python bench/seeds.py --seeds 0 1 --jobs 1 --threads 2 -- --iters 300   # after --: passed on to train.py

Each (model, seed) is one `python train.py --model M --seed S` with the recipe's defaults, in its own folder under
--out-dir; a run whose log.jsonl already ends with its final evaluation is read, not rerun, so an interrupted table
continues where it stopped (delete the folder to rerun; give other train.py options a new --out-dir). The final
number is the last evaluation in log.jsonl: val mIoU for segmentation, bbox AP for detection (and mask AP for
Mask R-CNN). The models are compared in the
order given: with two or more, the table says at which seeds the first is ahead of each other one.

Runs go side by side (--jobs) with --threads intra-op threads each; on a 2-core machine two one-thread runs take
about as long as one two-thread run, and a one-thread run's numbers do not depend on the load. Note the load
average (printed at the start and the end) with the wall times: other jobs move them by 2-10x; the CPU time (the
run's own, from wait4) moves much less and is about the wall time of a one-thread run on an idle core.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def final_numbers(log: Path):
    """{'mIoU' | 'AP' | 'segm_AP': value in %} of the run's last evaluation, or None if it has not ended."""
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "loss" not in r and ("mIoU" in r or "AP" in r)]
    steps = [r["iter"] for r in records if "loss" in r]
    if not evals or not steps or evals[-1]["iter"] != max(steps):
        return None
    return {k: 100 * evals[-1][k] for k in ("mIoU", "AP", "segm_AP") if k in evals[-1]}


def run_one(model: str, seed: int, args, extra) -> dict:
    """Train (model, seed) unless its folder already holds a finished run; {'numbers', 'wall_s', 'reused'}."""
    out = Path(args.out_dir).resolve() / f"{model}_seed{seed}"  # train.py runs in the repository root
    log = out / "log.jsonl"
    if (numbers := final_numbers(log)) is not None:
        timing = json.loads((out / "wall.json").read_text()) if (out / "wall.json").is_file() else {}
        return {"numbers": numbers, "wall_s": timing.get("wall_s"), "cpu_s": timing.get("cpu_s"), "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):  # an unfinished run starts over: its log would mix two runs
        if stale.is_file():
            stale.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--seed", str(seed), "--out-dir", str(out),
           *extra]
    start = time.perf_counter()
    with open(out / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever else runs beside it
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
    if rc != 0 or (numbers := final_numbers(log)) is None:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit status {rc}); its output: {out / 'stdout.txt'}")
    (out / "wall.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": args.threads,
                                               "load": os.getloadavg()}))
    return {"numbers": numbers, "wall_s": wall, "cpu_s": cpu, "reused": False}


def table(models, seeds, results) -> str:
    """Markdown rows: per-seed numbers, mean ± std, min, mean wall time; then who is ahead at which seeds."""
    lines = ["| model | metric | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± std | min | wall (mean) | CPU (mean) |", "|---|---|" + "---|" * (len(seeds) + 4)]

    def mean_of(model, key):
        times = [results[(model, s)][key] for s in seeds if results[(model, s)].get(key) is not None]
        return f"{statistics.mean(times):.0f} s" if times else "-"

    for model in models:
        for key in results[(model, seeds[0])]["numbers"]:
            values = [results[(model, s)]["numbers"][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| `{model}` | {key} | " + " | ".join(f"{v:.2f}" for v in values)
                         + f" | {statistics.mean(values):.2f} ± {std:.2f} | {min(values):.2f} | "
                         + f"{mean_of(model, 'wall_s')} | {mean_of(model, 'cpu_s')} |")
    first = models[0]
    key = next(iter(results[(first, seeds[0])]["numbers"]))
    for other in models[1:]:
        ahead = [s for s in seeds if results[(first, s)]["numbers"][key] > results[(other, s)]["numbers"][key]]
        lines.append(f"\n`{first}` ahead of `{other}` ({key}) at {len(ahead)} of {len(seeds)} seeds"
                     + (f" (not at seed {', '.join(str(s) for s in seeds if s not in ahead)})"
                        if len(ahead) < len(seeds) else ""))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["denseclip_tiny", "fpn_tiny"],
                        help="named configs; the first is compared with each other one")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="train.py --seed values")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--out-dir", default="runs/seeds", help="one folder per (model, seed) under it")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    print(f"{len(args.models) * len(args.seeds)} runs, {args.jobs} at a time, {args.threads} thread(s) each; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    runs = [(m, s) for s in args.seeds for m in args.models]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {run: pool.submit(run_one, *run, args, extra) for run in runs}
        results = {}
        for (model, seed), future in futures.items():
            results[(model, seed)] = res = future.result()
            how = " (read from its folder)" if res["reused"] else f" in {res['wall_s']:.0f} s, CPU {res['cpu_s']:.0f} s"
            print(f"  {model} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in res["numbers"].items()) + how,
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}\n\n" + table(args.models, args.seeds, results))


if __name__ == "__main__":
    main()
