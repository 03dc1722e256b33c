"""Training curves from train.py's log.jsonl as one PNG, drawn by matplotlib (`pip install -e ".[plot]"`).

    python tools/plot_log.py runs/demo                         # -> runs/demo/curves.png
    python tools/plot_log.py runs/a runs/b --out compare.png    # several runs compared, one colour each

Four panels against the iteration: the losses (every key starting with "loss": the total solid, its parts dashed
and dotted), the learning rate, the validation metric in % (mIoU; detectors: box AP, Mask R-CNN also mask AP) and
the speed (it/s). Each run has one colour in every panel, named in the legends (a single run: each loss its own
colour). Evaluations are few, so they are drawn as markers joined by lines: a run evaluated once shows one visible
point. Ticks and their labels are matplotlib's own (round numbers); lines of log.jsonl without a key are simply not
in that panel, and a panel with nothing to draw says so.
"""
import argparse
import json
from pathlib import Path

from denseclip.errors import DataError, MissingFileError, require_package, run_main
from denseclip.run.outputs import check_out_file

METRICS = (("mIoU", "mIoU"), ("AP", "box AP"), ("segm_AP", "mask AP"))  # log key, how the panel names it
STYLES = ("-", "--", ":", "-.")  # the losses of one run: the total first


def read_log(path: Path) -> list:
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (give a run folder with a log.jsonl, or the file itself)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not a JSON record ({e.msg}); was the file cut or edited?") from None
    return records


def series(records: list, key: str, scale: float = 1.0):
    """(iterations, values) of the records that have `key`."""
    points = [(r["iter"], r[key] * scale) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def loss_keys(records: list) -> list:
    """The loss keys of a run, the total ("loss") first, then its parts in the order the log has them."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("loss")))
    return sorted(keys, key=lambda k: k != "loss")


def draw(ax, xs, ys, colour, label, style="-", marker=None):
    """One line; a single point gets a marker whatever the style, so it is seen."""
    ax.plot(xs, ys, linestyle=style, color=colour, label=label, marker=marker or ("o" if len(xs) == 1 else None),
            markersize=5, linewidth=1.5)


def plot(runs: dict):
    """runs: {name: log records} -> a matplotlib Figure of four panels (the figure's axes, in reading order: loss,
    learning rate, validation metric, speed)."""
    matplotlib = require_package("matplotlib", "tools/plot_log.py", "plot")
    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    colours = matplotlib.colormaps["tab10"].colors
    multi = len(runs) > 1
    metrics = [label for key, label in METRICS if any(key in rec for records in runs.values() for rec in records)]
    titles = ("training loss", "learning rate", "validation", "speed")
    ylabels = ("loss", "learning rate", f"{', '.join(metrics) or 'metric'} (%)", "iterations / s")
    for r, (name, records) in enumerate(runs.items()):
        colour = colours[r % len(colours)]
        for i, key in enumerate(loss_keys(records)):
            draw(axes[0], *series(records, key), colour if multi else colours[i % len(colours)],
                 f"{name}: {key}" if multi else key, STYLES[i % len(STYLES)] if multi else "-")
        draw(axes[1], *series(records, "lr"), colour, name)
        drawn = [(key, label) for key, label in METRICS if series(records, key)[0]]
        for i, (key, label) in enumerate(drawn):  # the run's first metric solid (Mask R-CNN: mask AP dashed)
            draw(axes[2], *series(records, key, 100.0), colour, f"{name}: {label}" if multi else label, STYLES[i],
                 marker="o")
        draw(axes[3], *series(records, "it_per_s"), colour, name)
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(steps=[1, 2, 5, 10], integer=True))  # 1, 2 or 5 x 10^k apart
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "(not in the log)", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # lr: 1e-4-sized numbers
    return fig


def run_folder(path: Path) -> Path:
    return (path if path.is_dir() else path.parent).resolve()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with log.jsonl) or log.jsonl files")
    p.add_argument("--out", help="PNG to write (default: curves.png next to the first log)")
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.runs]
    folders = [run_folder(q) for q in paths]
    names = [f.name for f in folders]  # runs of one name (a/demo, b/demo) are told apart by their parent folder
    runs = {f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name: read_log(q)
            for f, q in zip(folders, paths)}
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "curves.png"
    check_out_file(out, "--out", make_folder=True)  # before the work: a file, a folder it may make
    fig = plot(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return out, fig


if __name__ == "__main__":
    run_main(main)
