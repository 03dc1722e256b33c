"""Training curves from train.py's log.jsonl as one PNG, drawn with PIL only: no server, no matplotlib.

    python tools/plot_log.py runs/demo                         # -> runs/demo/curves.png
    python tools/plot_log.py runs/a runs/b --out compare.png    # several runs, one colour each

Panels: the losses (every key starting with "loss"), the learning rate, validation mIoU (%) and speed (it/s),
each against the iteration. Lines of log.jsonl without a key are simply not in that panel.
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from denseclip.errors import DataError, MissingFileError, run_main
from denseclip.run.outputs import check_out_file

PANEL_W, PANEL_H = 420, 240  # one panel's size in pixels
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 20, 26  # plot margins: room for the tick labels and the title
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]  # distinguishable on white (the "tab10" colours)
GRID, AXIS, TEXT = (225, 225, 225), (90, 90, 90), (0, 0, 0)


def read_log(path: Path) -> list:
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (give a run folder that holds log.jsonl, or the file itself)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not a JSON record ({e.msg}); was the file cut or edited?") from None
    return records


def series(records: list, key: str, scale: float = 1.0):
    return [(r["iter"], r[key] * scale) for r in records if key in r and r[key] is not None]


def ticks(lo: float, hi: float, n: int = 5) -> list:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def draw_panel(title: str, lines: list) -> Image.Image:
    """lines: (label, colour, [(x, y), ...]); a blank panel saying so when there is nothing to draw."""
    im = Image.new("RGB", (PANEL_W, PANEL_H), (255, 255, 255))
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    d.text((LEFT, 4), title, fill=TEXT, font=font)
    points = [p for _, _, pts in lines for p in pts]
    if not points:
        d.text((LEFT, PANEL_H // 2), "(not in the log)", fill=AXIS, font=font)
        return im
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)
    w, h = PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM

    def to_px(x, y):
        return LEFT + (x - x0) / (x1 - x0) * w, TOP + h - (y - y0) / (y1 - y0) * h

    for v in ticks(y0, y1):
        _, py = to_px(x0, v)
        d.line([(LEFT, py), (LEFT + w, py)], fill=GRID)
        d.text((4, py - 6), f"{v:.3g}", fill=TEXT, font=font)
    for v in ticks(x0, x1):
        px, _ = to_px(v, y0)
        d.line([(px, TOP), (px, TOP + h)], fill=GRID)
        d.text((px - 10, TOP + h + 6), f"{v:.0f}", fill=TEXT, font=font)
    d.rectangle([LEFT, TOP, LEFT + w, TOP + h], outline=AXIS)
    for i, (label, colour, pts) in enumerate(lines):
        xy = [to_px(x, y) for x, y in pts]
        if len(xy) == 1:
            d.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=colour)
        else:
            d.line(xy, fill=colour, width=2)
        d.text((LEFT + w - 150, TOP + 4 + 12 * i), label, fill=colour, font=font)
    return im


def plot(runs: dict) -> Image.Image:
    """runs: {name: records} -> a 2 x 2 grid of panels."""
    multi = len(runs) > 1
    loss_lines, lr_lines, miou_lines, speed_lines = [], [], [], []
    for r, (name, records) in enumerate(runs.items()):
        keys = sorted({k for rec in records for k in rec if k.startswith("loss")})
        for i, k in enumerate(keys):
            colour = COLOURS[(r * len(keys) + i) % len(COLOURS)]
            loss_lines.append((f"{name}: {k}" if multi else k, colour, series(records, k)))
        colour = COLOURS[r % len(COLOURS)]
        lr_lines.append((name, colour, series(records, "lr")))
        miou_lines.append((name, colour, series(records, "mIoU", 100.0)))
        speed_lines.append((name, colour, series(records, "it_per_s")))
    panels = [draw_panel("loss", loss_lines), draw_panel("learning rate", lr_lines),
              draw_panel("val mIoU (%)", miou_lines), draw_panel("speed (it/s)", speed_lines)]
    out = Image.new("RGB", (2 * PANEL_W, 2 * PANEL_H), (255, 255, 255))
    for i, panel in enumerate(panels):
        out.paste(panel, ((i % 2) * PANEL_W, (i // 2) * PANEL_H))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with log.jsonl) or log.jsonl files")
    p.add_argument("--out", help="PNG to write (default: curves.png next to the first log)")
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.runs]
    runs = {(q if q.is_dir() else q.parent).name or str(q): read_log(q) for q in paths}
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "curves.png"
    check_out_file(out, "--out")
    plot(runs).save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main)
