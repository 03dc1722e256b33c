"""Data-loading speed of the ADE20K training pipeline on one core: our torch/torchvision transforms against the
same mmseg pipeline on OpenCV (cv2.resize / cv2.cvtColor, NumPy elsewhere: what mmseg runs).

    python bench/loader.py                  # both paths (the OpenCV one only if cv2 is installed)
    python bench/loader.py --no-opencv      # hides cv2 first, as on a machine without it

One sample is what a DataLoader worker does for ADE20K: decode a 683x512 JPEG and its PNG label (image_io's
readers, as the dataset), then TrainTransform at the official settings (scale (2048, 512) x U(0.5, 2), crop 512
with cat_max_ratio 0.75, flip, photometric distortion, normalise, pad). Both paths draw the same random numbers per
sample. Images/s per worker is 1 / (seconds per sample); a training step of B images per GPU needs B / step-time
images/s from the workers.
Times are this process's CPU time (time.process_time), not wall time: on a shared machine the wall clock also
counts the time other processes held the core, which penalises long computations more than short ones.
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip.data import transforms as T  # noqa: E402
from denseclip.data.image_io import read_image, read_label  # noqa: E402


def opencv_train_transform(t: T.TrainTransform, cv2, image, label, rng):
    """The same pipeline with OpenCV's resize and colour conversions (mmcv's), NumPy for the rest."""
    scale = t.scale
    lo, hi = t.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    w, h = T.rescale_size(image.shape[1], image.shape[0], (int(scale[0] * ratio), int(scale[1] * ratio)))
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    y, x = t.crop_box(label, rng)
    ch, cw = t.crop_size
    image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    if rng.random() < t.flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]
    image = np.ascontiguousarray(image)

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if rng.integers(2):
        image = convert(image, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        image = contrast(image)
    x = (image.astype(np.float32) / 255.0 - np.float32(T.CLIP_MEAN)) / np.float32(T.CLIP_STD)
    img = torch.from_numpy(x.transpose(2, 0, 1).copy())
    out_img = img.new_zeros(3, max(ch, img.shape[1]), max(cw, img.shape[2]))
    out_img[:, :img.shape[1], :img.shape[2]] = img
    out_lbl = torch.full(out_img.shape[1:], t.ignore_index, dtype=torch.int64)
    out_lbl[:label.shape[0], :label.shape[1]] = torch.from_numpy(label.astype(np.int64))
    return out_img, out_lbl


def ade_like_sample(seed: int):
    """A 683x512 JPEG of smooth colour blobs and a PNG label of ~12 regions, as encoded bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (16, 22, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((683, 512), Image.BILINEAR))
    label = np.kron(rng.integers(0, 151, (4, 3)), np.ones((128, 228), np.int64))[:512, :683].astype(np.uint8)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, "JPEG", quality=90)
    Image.fromarray(label).save(png, "PNG")
    return jpg.getvalue(), png.getvalue()


def decode(jpg: bytes, png: bytes):
    """The dataset's own readers (image_io): the image upright as RGB, the label with ADE20K's 0 -> 255 rule."""
    return read_image(io.BytesIO(jpg)), read_label(io.BytesIO(png), reduce_zero_label=True, num_classes=150)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=40, help="timed samples per path (each with its own draws)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the fastest round of each path counts")
    p.add_argument("--no-opencv", action="store_true", help="hide cv2 (sys.modules['cv2'] = None) before anything")
    args = p.parse_args(argv)
    if args.no_opencv:
        sys.modules["cv2"] = None
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None
    torch.set_num_threads(1)  # one DataLoader worker = one core
    t = T.TrainTransform()
    data = [ade_like_sample(i) for i in range(8)]
    paths = {"torch": lambda im, lb, rng: t(im, lb, rng)}
    if cv2 is not None:
        paths["opencv"] = lambda im, lb, rng: opencv_train_transform(t, cv2, im, lb, rng)
    best = {k: {"transform": float("inf"), "decode": float("inf")} for k in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            spent = {"transform": 0.0, "decode": 0.0}
            for i in range(args.samples):
                t0 = time.process_time()
                image, label = decode(*data[i % len(data)])
                t1 = time.process_time()
                fn(image, label, np.random.default_rng([0, i]))
                spent["decode"] += t1 - t0
                spent["transform"] += time.process_time() - t1
            for k, v in spent.items():
                best[name][k] = min(best[name][k], v / args.samples)
    print(f"ADE20K-sized train pipeline (683x512 JPEG, crop 512), one core, torch {torch.__version__}, "
          f"OpenCV {cv2.__version__ if cv2 else 'not available'}")
    print(f"{'path':8s} {'decode ms':>10s} {'transform ms':>13s} {'images/s/worker':>16s}")
    for name, b in best.items():
        print(f"{name:8s} {1e3 * b['decode']:10.1f} {1e3 * b['transform']:13.1f} "
              f"{1 / (b['decode'] + b['transform']):16.1f}")
    if "opencv" in best:
        print(f"transform time torch / OpenCV: {best['torch']['transform'] / best['opencv']['transform']:.2f}x "
              f"(target <= 1.5x)")
    return best


if __name__ == "__main__":
    main()
