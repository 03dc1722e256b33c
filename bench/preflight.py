"""How long the data pre-flight takes, on a test-made tree in ADE20K's layout (no ADE20K here).

    python bench/preflight.py [--train 4000] [--val 400] [--label-size 683 512]

Writes `--train` + `--val` tiny JPEG/PNG pairs (64x48) in data/ade/ADEChallengeData2016's layout to a temporary
folder and times `check_data` at --check-data quick (pairing + headers, validation labels decoded) and full (every
file decoded). The header part does not depend on the image size (only the file header is read); decoding does, so
the validation-label decode is also timed on `--label-size` labels (ADE20K's typical 683x512; blocky class maps,
which PNG compresses about as well as real ones). The last lines extrapolate to ADE20K's 20,210 + 2,000 files.
"""
import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from denseclip.preflight import check_data, label_problem

ADE_TRAIN, ADE_VAL = 20210, 2000


def write_tree(root: Path, n_train: int, n_val: int):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 151, (48, 64), dtype=np.uint8))
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image.save(root / f"images/{split}/ADE_{split}_{i:08d}.jpg")
            label.save(root / f"annotations/{split}/ADE_{split}_{i:08d}.png")


def blocky_label(rng, w: int, h: int) -> np.ndarray:
    """A class map of 16x16-pixel blocks with values 0..150."""
    blocks = rng.integers(0, 151, (h // 16 + 1, w // 16 + 1), dtype=np.uint8)
    return np.kron(blocks, np.ones((16, 16), np.uint8))[:h, :w]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--label-size", type=int, nargs=2, default=[683, 512], metavar=("W", "H"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        write_tree(root, args.train, args.val)
        times = {}
        for level in ("quick", "full"):
            opts = SimpleNamespace(dataset="ade20k", data_root=str(root), check_data=level, val_size=None)
            t0 = time.perf_counter()
            print(check_data(opts, 4))
            times[level] = time.perf_counter() - t0
        big = Path(tmp) / "big"
        big.mkdir()
        rng = np.random.default_rng(0)
        for i in range(50):
            Image.fromarray(blocky_label(rng, *args.label_size)).save(big / f"{i}.png")
        t0 = time.perf_counter()
        for i in range(50):
            assert label_problem(big / f"{i}.png", 150, True) is None
        per_label = (time.perf_counter() - t0) / 50
    n = args.train + args.val
    quick_per_pair = times["quick"] / n
    print(f"quick: {times['quick']:.2f} s for {n} pairs ({1e3 * quick_per_pair:.2f} ms/pair incl. {args.val} tiny "
          f"validation labels decoded); full: {times['full']:.2f} s")
    print(f"one {args.label_size[0]}x{args.label_size[1]} label decoded and checked: {1e3 * per_label:.1f} ms "
          "(one thread)")
    est = (ADE_TRAIN + ADE_VAL) * quick_per_pair + ADE_VAL * per_label
    print(f"ADE20K estimate, quick: {(ADE_TRAIN + ADE_VAL) * quick_per_pair:.1f} s of pairs and headers + "
          f"{ADE_VAL * per_label:.1f} s of validation labels (one thread; the pre-flight uses a pool) = {est:.1f} s "
          "(warm file cache, this machine)")


if __name__ == "__main__":
    main()
