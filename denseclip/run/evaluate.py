"""Evaluation: one model over one dataset, every rank an unpadded shard, the metric summed over the ranks.
Segmentation gives a confusion matrix (metrics.ConfusionMatrix), detection a coco_eval.CocoEvaluator; --show-dir
pictures are written as the images go by."""
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from ..data.coco import CocoDetection
from ..progress import progress
from .batches import collate_detection, is_detection, to_device
from .coco_eval import CocoEvaluator
from .metrics import ConfusionMatrix
from .step import autocast
from .visualize import draw_detections, palette


AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test (with horizontal flip)


def image_name(dataset, index: int) -> str:
    """Where the prediction for sample `index` goes under --show-dir: the image's relative path, as .png."""
    if hasattr(dataset, "samples"):
        return Path(dataset.samples[index][0]).relative_to(dataset.img_dir).with_suffix(".png").as_posix()
    if isinstance(dataset, CocoDetection):
        return Path(dataset.coco.imgs[dataset.ids[index]]["file_name"]).with_suffix(".png").as_posix()
    return f"{index:06d}.png"


@torch.no_grad()
def evaluate(model, dataset, device, mode=None, ratios=(1.0,), flip=False, amp="none", workers=0, show_dir=None):
    """Confusion matrix of `model` on `dataset`, summed over all ranks; one image at a time (sizes differ).
    Detectors: a CocoEvaluator holding every rank's detections (mode, ratios, flip unused)."""
    if is_detection(model):
        return evaluate_detection(model, dataset, device, amp, workers, show_dir)
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    cm = ConfusionMatrix(model.num_classes, model.cfg.ignore_index)
    for index, (image, label) in progress(zip(indices, loader), "eval", total=len(indices)):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)  # (1, 3, h, w)
        with autocast(device, amp):
            probs = model.predict(image, out_size=label.shape[-2:], ratios=ratios, flip=flip, mode=mode)
        pred = probs.argmax(dim=1)  # (1, H, W) at the label's resolution
        cm.update(pred, label)
        if show_dir:
            path = Path(show_dir) / image_name(dataset, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(pred[0].to(torch.uint8).cpu().numpy(), mode="P")
            im.putpalette(palette())
            im.save(path)  # a palette PNG: viewable, and its pixel values are the class indices
    cm.reduce_from_all_processes()
    return cm


@torch.no_grad()
def evaluate_detection(model, dataset, device, amp="none", workers=0, show_dir=None) -> CocoEvaluator:
    """Detections on `dataset` gathered from all ranks, ready for COCOeval. One image at a time, as mmdet tests:
    a batch would pad images to a common size, and the attention pool's global token would then see the
    padding, so a detection would depend on which images it was batched with (and on the number of ranks).
    show_dir: also write each image with its detections drawn (draw_detections)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, collate_fn=collate_detection,
                                         pin_memory=device.type == "cuda")
    evaluator = CocoEvaluator(dataset)
    for index, batch in zip(indices, loader):
        images, targets = to_device(batch, device)
        with autocast(device, amp):
            det = model(images)[0]  # boxes (n, 4) xyxy in the image's own pixels, scores (n,), labels (n,)
        evaluator.update(index, int(targets[0]["image_id"]), det)
        if show_dir:  # boxes, names, scores (and mask outlines) over the image
            path = Path(show_dir) / image_name(dataset, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(images[0], det, dataset.class_names).save(path)
    evaluator.reduce_from_all_processes()
    return evaluator
