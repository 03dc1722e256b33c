"""The two tasks the scripts run, each one object: what differs between semantic segmentation (the paper's ADE20K
experiments) and detection (its COCO experiments, RetinaNet and Mask R-CNN) is defined here once, and train.py,
eval.py and demo.py pick a task (`task_for(model name)`) and call it instead of branching on the task.

A task says: its default recipe (the options a run leaves unset), its datasets (built by denseclip/data/options.py)
and their pre-flight (denseclip/data/preflight.py), how a batch is collated, its learning-rate schedule, how a
model predicts at test time, its metric and the summary line and log record of that metric, what --out writes and
what a --show-dir picture shows. Mask R-CNN is a detection task with its own recipe.

No upstream counterpart as such: mmseg and mmdet are two frameworks, each with its own runner, config tree and
evaluation hook; here they share one loop (train.py, run/evaluate.py) and differ only in these objects.
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..configs import CONFIGS, task_of
from ..errors import ConfigError
from ..data import options, preflight
from .batches import collate_detection
from .coco_eval import STAT_NAMES, CocoEvaluator
from .evaluate import image_name
from .metrics import ConfusionMatrix
from .optim import lr_at, step_lr_at
from .visualize import denormalize, detection_picture, label_png, save_png, score_picture, segmentation_picture


def recipe_key(dataset: str) -> str:
    """Which recipe of a task a run takes: 'procedural' on the built-in shapes, else 'official'."""
    return "procedural" if dataset == "procedural" else "official"


class Task:
    """What both tasks do alike: their recipe by dataset, and the pre-flight with their own checks."""
    title: str  # how --help names the task's models
    recipes: dict  # 'official' / 'procedural' -> (what the recipe is, {option: default})
    check = None  # the pre-flight checks of the task's file datasets (denseclip/data/preflight.py)

    def recipe(self, dataset: str) -> dict:
        """The defaults of the options a run on `dataset` leaves unset."""
        return self.recipes[recipe_key(dataset)][1]

    def check_data(self, args, min_train: int = 1, splits=("train", "val")) -> str:
        """The data pre-flight of the data options (preflight.check_data) with this task's checks."""
        return preflight.check_data(args, min_train, splits, check=self.check)


class Segmentation(Task):
    """Semantic segmentation: DenseCLIP segmentors and their FPN baselines (denseclip_*, fpn_*), mmseg's recipe."""
    title = "segmentation (denseclip_*, fpn_*)"
    # File datasets (ADE20K, the other mmseg layouts, user folders): the official ADE20K schedule, 80k iterations
    # at global batch 32 (4 images x 8 GPUs; data/README.md gives mmseg's per-dataset recipes). Procedural: a
    # CPU-sized run of the tiny models, about 7 minutes on one core; it starts from random weights (no CLIP weights
    # for the tiny models), so it uses a higher lr and no backbone lr reduction (x0.1 protects pretrained CLIP
    # weights, of which there are none here). Warm-up 600: at lr 2e-3 from step 50, most seeds' random image
    # encoders sat 1000+ steps on a background-only plateau (the initial weights decide, not the data order); a
    # ramp to 2e-3 over 600 steps leaves it by step ~500 at every seed tried (bench/README.md, seeds.py).
    recipes = {
        "official": ("--dataset ade20k, voc21, ..., folder: the official recipe (mmseg)",
                     dict(iters=80000, batch_size=4, global_batch=32, lr=1e-4, warmup_iters=1500,
                          backbone_lr_mult=0.1, eval_interval=8000, save_interval=8000, workers=4, threads=0)),
        "procedural": ("--dataset procedural: tiny models from random weights, ~7 min on one CPU core",
                       dict(iters=3000, batch_size=8, global_batch=None, lr=2e-3, warmup_iters=600,
                            backbone_lr_mult=1.0, eval_interval=1000, save_interval=1000, workers=0, threads=1)),
    }
    check = staticmethod(preflight.check_segmentation)
    collate = None  # torch's default: crops of one size stack into (B, 3, H, W) images and (B, H, W) labels
    cudnn_benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels (as mmseg)

    def dataset(self, args, split: str, cfg):
        return options.segmentation_dataset(args, split, args.crop_size or cfg.input_resolution)

    def schedule(self, args, num_train: int):
        """lr(it, base_lr): mmseg's poly decay to --min-lr with linear warmup, over --iters."""
        return lambda it, base_lr: lr_at(it, base_lr, args.iters, args.warmup_iters, args.min_lr)

    def test_options(self, args, model) -> dict:
        """eval.py's test-time options: sliding or whole image, scales and flip (--aug-test: the official ones)."""
        return {"mode": args.mode or model.cfg.test_mode, "ratios": args.ratios, "flip": args.flip}

    def metric(self, model, dataset):
        return ConfusionMatrix(model.num_classes, model.cfg.ignore_index)

    def predict(self, model, images, labels, mode=None, ratios=(1.0,), flip=False):
        """Class indices (1, H, W) at the label's resolution: the softmax averaged over scales and flips, resized
        back to the label's size (as mmseg: the test transform resizes only the image)."""
        probs = model.predict(images, out_size=labels.shape[-2:], ratios=ratios, flip=flip, mode=mode)
        return probs.argmax(dim=1)

    def update(self, metric, index: int, pred, labels):
        metric.update(pred, labels)

    def show(self, images, pred, dataset, path: Path, title=()):
        """--show-dir: at `path` the explained picture (visualize.segmentation_picture: the prediction over the
        photo at the label's resolution, title, legend), and next to it NAME_label.png, whose pixel values are the
        class indices (a palette PNG in the picture's colours)."""
        pred = pred[0].cpu().numpy()  # (H, W) at the label's size; the image is at the test size
        photo = np.asarray(Image.fromarray(denormalize(images[0])).resize(pred.shape[::-1], Image.BILINEAR))
        picture, info = segmentation_picture(photo, pred, dataset.class_names, title)
        save_png(picture, path, **info)
        label_png(pred, len(dataset.class_names)).save(path.with_name(path.stem + "_label.png"))

    def summary(self, res: dict, it: int) -> str:
        return (f"iter {it}: val mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}  "
                f"aAcc {100 * res['aAcc']:.2f}")

    def record(self, res: dict) -> dict:
        """The numbers of an evaluation that log.jsonl (and TensorBoard's val/) keep."""
        return {k: res[k] for k in ("mIoU", "mAcc", "aAcc")}

    def final(self, res: dict, run: str) -> str:
        return f"val mIoU {100 * res['mIoU']:.2f} ({run})"

    def report(self, res: dict) -> str:
        """eval.py's last line after the table: nothing here, the table ends with the aAcc / mIoU / mAcc line."""
        return ""

    def write_out(self, path: str, metric, res: dict, dataset, meta: dict):
        """eval.py --out: the metrics and per-class IoU / Acc as JSON, with what was evaluated how (meta)."""
        Path(path).write_text(json.dumps({**meta, **res, "class_names": list(dataset.class_names)}, indent=1))

    @torch.no_grad()
    def score_pictures(self, model, dataset, names, show_dir: str, count: int, device):
        """eval.py --score-maps: score-map pictures (visualize.score_picture) of the first `count` images, at their
        test size, next to the predictions under show_dir."""
        model.eval()
        for index in range(min(count, len(dataset))):
            image = dataset[index][0]  # (3, h, w) normalised
            scores = model.score_logits(image[None].to(device), names)[0] * model.cfg.tau  # (K', h, w) cosine
            picture, value_range = score_picture(denormalize(image), scores.cpu().numpy(), names)
            path = Path(show_dir) / image_name(dataset, index)
            save_png(picture, path.with_name(path.stem + "_scores.png"), names=names, range=value_range)


class Detection(Task):
    """Object detection (and instance segmentation) on COCO: DenseCLIP RetinaNet and Mask R-CNN, mmdet's recipe.
    Images keep their own sizes, training counts in epochs, and the metric is COCOeval's AP."""
    check = staticmethod(preflight.check_coco)
    collate = staticmethod(collate_detection)  # lists of images and target dicts: each image keeps its size
    cudnn_benchmark = False  # images differ in size (as mmdet)

    def __init__(self, title: str, recipes: dict):
        self.title, self.recipes = title, recipes

    def dataset(self, args, split: str, cfg):
        """Procedural images are the model's min_size unless --crop-size; Mask R-CNN trains on instance masks."""
        masks = split == "train" and cfg.detector == "maskrcnn"
        return options.detection_dataset(args, split, args.crop_size or cfg.min_size, masks)

    def schedule(self, args, num_train: int):
        """lr(it, base_lr): mmdet's step schedule (x0.1 at --lr-steps epochs) with linear warmup. mmdet counts in
        epochs; one is num_train // global batch optimiser steps here, and --iters, --eval-interval and
        --save-interval left unset are filled in from it (epochs x steps, one epoch, one epoch)."""
        per_epoch = max(num_train // args.global_batch, 1)
        args.iters = args.iters or args.epochs * per_epoch
        steps = [e * per_epoch for e in args.lr_steps]
        args.eval_interval = per_epoch if args.eval_interval is None else args.eval_interval
        args.save_interval = per_epoch if args.save_interval is None else args.save_interval
        return lambda it, base_lr: step_lr_at(it, base_lr, steps, args.warmup_iters)

    def test_options(self, args, model) -> dict:
        if args.mode or args.flip or args.ratios != [1.0]:
            raise ConfigError("--mode, --ratios, --flip and --aug-test are segmentation options; a detector "
                              "is tested at its config's min_size/max_size (--set min_size=N --set max_size=N)")
        return {}

    def metric(self, model, dataset):
        return CocoEvaluator(dataset)

    def predict(self, model, images, targets):
        """boxes (n, 4) xyxy in the image's own pixels, scores (n,), labels (n,) (Mask R-CNN: masks too)."""
        return model(images)[0]

    def update(self, metric, index: int, det: dict, targets):
        metric.update(index, int(targets[0]["image_id"]), det)

    def show(self, images, det: dict, dataset, path: Path, title=()):
        """--show-dir: the image with its boxes, class names, scores (and masks) above the score threshold, title
        and legend (visualize.detection_picture), at `path`."""
        picture, info = detection_picture(images[0], det, dataset.class_names, title)
        save_png(picture, path, **info)

    def summary(self, res: dict, it: int) -> str:
        segm = res.get("segm")  # Mask R-CNN: the mask numbers
        return (f"iter {it}: bbox AP {100 * res['AP']:.2f}  AP50 {100 * res['AP50']:.2f}  AP75 {100 * res['AP75']:.2f}"
                + (f"  segm AP {100 * segm['AP']:.2f}" if segm else ""))

    def record(self, res: dict) -> dict:
        segm = res.get("segm")
        return {**{k: res[k] for k in STAT_NAMES}, **({f"segm_{k}": segm[k] for k in STAT_NAMES} if segm else {})}

    def final(self, res: dict, run: str) -> str:
        return f"{run}:\n{self.report(res)}"

    def report(self, res: dict) -> str:
        """`bbox AP <AP@[.5:.95] x 100>` (Mask R-CNN: then `segm AP <mask AP>`)."""
        return f"bbox AP {100 * res['AP']:.2f}" + (f"\nsegm AP {100 * res['segm']['AP']:.2f}" if "segm" in res else "")

    def write_out(self, path: str, metric, res: dict, dataset, meta: dict):
        """eval.py --out: the detections as a COCO results JSON; Mask R-CNN's masks (RLE) next to it with the
        suffix .segm.json, as mmdet's .bbox.json / .segm.json."""
        Path(path).write_text(json.dumps(metric.results))
        if "segm" in res:
            Path(path).with_suffix(".segm.json").write_text(json.dumps(metric.segm_results))

    def score_pictures(self, model, dataset, names, show_dir: str, count: int, device):
        """Nothing: score-map pictures are drawn for segmentors (eval.py leaves --score-maps unused here)."""


SEGMENTATION = Segmentation()
# Detection (retinanet_*): mmdet's COCO 1x, 12 epochs at global batch 16 (2 images x 8 GPUs), lr x0.1 at epochs 8
# and 11, evaluation and checkpoint every epoch (eval/save intervals left unset = one epoch). Procedural: the same
# 1x shape (12 epochs, steps at 8 and 11) over 2000-image epochs, sized like the procedural segmentation run (3000
# steps of 8 images); from random weights, like it.
DETECTION = Detection("detection (retinanet_*)", {
    "official": ("--dataset coco: mmdet's 1x recipe",
                 dict(epochs=12, lr_steps=[8, 11], batch_size=2, global_batch=16, lr=1e-4, warmup_iters=500,
                      backbone_lr_mult=0.1, clip_grad=0.1, workers=2, threads=0)),
    "procedural": ("--dataset procedural: the 1x shape over procedural epochs, from random weights",
                   dict(epochs=12, lr_steps=[8, 11], batch_size=8, global_batch=None, lr=1e-3, warmup_iters=50,
                        backbone_lr_mult=1.0, clip_grad=1.0, eval_interval=1000, save_interval=1000, workers=0,
                        threads=1)),
})
# Mask R-CNN (maskrcnn_*) on COCO: the same 1x recipe at twice the lr (every official mask_rcnn_*_fpn_1x_coco
# config: 2e-4). On procedural shapes: the same 12-epoch shape, but a step costs about three RetinaNet steps on CPU
# (RPN, two RoI heads, mask targets), so 640-image epochs of 4-image steps (1920 iterations).
MASKRCNN = Detection("Mask R-CNN (maskrcnn_*)", {
    "official": ("--dataset coco: the official configs (the 1x recipe at twice the lr)",
                 dict(epochs=12, lr_steps=[8, 11], batch_size=2, global_batch=16, lr=2e-4, warmup_iters=500,
                      backbone_lr_mult=0.1, clip_grad=0.1, workers=2, threads=0)),
    "procedural": ("--dataset procedural: the 1x shape over shorter epochs, from random weights",
                   dict(epochs=12, train_size=640, lr_steps=[8, 11], batch_size=4, global_batch=None, lr=1e-3,
                        warmup_iters=50, backbone_lr_mult=1.0, clip_grad=1.0, eval_interval=0, save_interval=1000,
                        workers=0, threads=1)),
})
TASKS = (SEGMENTATION, DETECTION, MASKRCNN)


def task_for(model: str) -> Task:
    """The task of a named config: segmentation, detection (RetinaNet) or Mask R-CNN."""
    if task_of(model) == "segmentation":
        return SEGMENTATION
    return MASKRCNN if CONFIGS[model]().detector == "maskrcnn" else DETECTION
