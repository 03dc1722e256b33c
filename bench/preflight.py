"""How long the data pre-flight takes, on a test-made tree in ADE20K's or COCO 2017's layout (neither is here).

    python bench/preflight.py [--train 4000] [--val 400] [--label-size 683 512]
    python bench/preflight.py --dataset coco [--train 2000] [--val 200] [--image-size 640 480]

Writes `--train` + `--val` tiny JPEG/PNG pairs (64x48) in data/ade/ADEChallengeData2016's layout to a temporary
folder and times `check_data` at --check-data quick (pairing + headers, validation labels decoded) and full (every
file decoded). The header part does not depend on the image size (only the file header is read); decoding does, so
the validation-label decode is also timed on `--label-size` labels (ADE20K's typical 683x512; blocky class maps,
which PNG compresses about as well as real ones). The last lines extrapolate to ADE20K's 20,210 + 2,000 files.

--dataset coco writes tiny JPEGs (64x48) under train2017/ and val2017/ and the two jsons with COCO's density: 7.3
annotations per image, each with a 28-point polygon, about the bytes per annotation of instances_train2017.json
(so parsing costs what it would). It times check_data quick (json parse and checks, image headers) and full (every
image decoded), then the decode of `--image-size` JPEGs (COCO's typical 640x480) alone, and extrapolates to COCO
2017's 118,287 + 5,000 images.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from denseclip.data.image_io import read_image
from denseclip.data.preflight import check_data, label_problem

ADE_TRAIN, ADE_VAL = 20210, 2000
COCO_TRAIN, COCO_VAL = 118287, 5000  # images in instances_{train,val}2017.json (860,001 + 36,781 annotations)
COCO_BYTES_PER_ANN = 469785474 / 860001  # instances_train2017.json's size over its annotations (~546 bytes)
ANNS_PER_IMAGE = 7.3  # COCO 2017 train: 860,001 annotations over 118,287 images


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


def write_coco(root: Path, n_train: int, n_val: int) -> int:
    """COCO 2017's layout with tiny images; returns the training json's bytes per annotation."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "one.jpg")
    jpeg = (root / "one.jpg").read_bytes()
    cats = [{"id": c, "name": f"class {c}", "supercategory": "thing"} for c in range(1, 81)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir()
        images, anns = [], []
        for i in range(n):
            name = f"{i:012d}.jpg"
            (root / f"{split}2017" / name).write_bytes(jpeg)
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48, "license": 1,
                           "coco_url": f"http://images.cocodataset.org/{split}2017/{name}", "date_captured": ""})
            for _ in range(int(ANNS_PER_IMAGE + rng.random())):  # 7 or 8: 7.3 on average
                x, y = rng.uniform(0, 40, 2).round(2)
                polygon = (rng.uniform(0, 20, 56) + np.tile([x, y], 28)).round(2).tolist()
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                             "segmentation": [polygon], "area": 150.25, "bbox": [x, y, 20.0, 20.0], "iscrowd": 0})
        text = json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats})
        (root / f"annotations/instances_{split}2017.json").write_text(text)
        if split == "train":
            bytes_per_ann = len(text) // len(anns)
    return bytes_per_ann


def time_checks(opts: dict, min_train: int) -> dict:
    times = {}
    for level in ("quick", "full"):
        t0 = time.perf_counter()
        print(check_data(SimpleNamespace(check_data=level, val_size=None, **opts), min_train))
        times[level] = time.perf_counter() - t0
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["ade20k", "coco"], default="ade20k")
    p.add_argument("--train", type=int, help="training images (default: ade20k 4000, coco 2000)")
    p.add_argument("--val", type=int, help="validation images (default: ade20k 400, coco 200)")
    p.add_argument("--label-size", type=int, nargs=2, default=[683, 512], metavar=("W", "H"))
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    args = p.parse_args(argv)
    coco = args.dataset == "coco"
    args.train = args.train or (2000 if coco else 4000)
    args.val = args.val or (200 if coco else 400)
    (coco_main if coco else ade_main)(args)


def coco_main(args):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coco"
        bytes_per_ann = write_coco(root, args.train, args.val)
        opts = {"dataset": "coco", "data_root": str(root), "train_ann": None, "train_images": None,
                "val_ann": None, "val_images": None}
        times = time_checks(opts, 4)
        rng = np.random.default_rng(0)
        w, h = args.image_size
        for i in range(20):  # smooth content, as photos: JPEG sizes (hence decode times) near real ones
            small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(Path(tmp) / f"{i}.jpg", quality=90)
        t0 = time.perf_counter()
        for i in range(20):
            read_image(Path(tmp) / f"{i}.jpg")
        per_image = (time.perf_counter() - t0) / 20
    n, n_coco = args.train + args.val, COCO_TRAIN + COCO_VAL
    print(f"quick: {times['quick']:.2f} s for {n} images ({1e3 * times['quick'] / n:.2f} ms/image incl. the json, "
          f"{bytes_per_ann} bytes/annotation; COCO's: {COCO_BYTES_PER_ANN:.0f}); full: {times['full']:.2f} s")
    print(f"one {w}x{h} JPEG decoded: {1e3 * per_image:.1f} ms (one thread)")
    print(f"COCO 2017 estimate, quick: {n_coco * times['quick'] / n:.0f} s; full: + {n_coco * per_image:.0f} s of "
          "decoding on one thread (the pre-flight uses a pool) (warm file cache, this machine)")


def ade_main(args):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        write_tree(root, args.train, args.val)
        times = time_checks({"dataset": "ade20k", "data_root": str(root)}, 4)
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
