"""Evaluation: one model over one dataset, every rank an unpadded shard, the metric summed over the ranks. One loop
for both tasks; the task (tasks.py) says how to predict, what the metric is and what a --show-dir picture shows.

Mirrors torchvision's references `evaluate`. One image at a time, as mmseg and mmdet test: segmentation images
differ in size, and a detection batch would pad its images to a common size, where the attention pool's global
token would see the padding (a detection would then depend on its batch and on the number of ranks). The shards are
rank, rank + world, ...: DistributedSampler would pad the last one with repeated images and count them twice."""
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.coco import CocoDetection
from ..progress import progress
from .batches import ignore_stop_signals, to_device
from .outputs import inside
from .step import autocast, in_format, memory_format

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the official multi-scale test (with horizontal flip)


def image_name(dataset, index: int) -> str:
    """Where the picture of sample `index` goes under --show-dir: the image's relative path, as .png (a name from
    the json that would climb out of --show-dir keeps only its parts that stay in)."""
    if hasattr(dataset, "samples"):
        return Path(dataset.samples[index][0]).relative_to(dataset.img_dir).with_suffix(".png").as_posix()
    if isinstance(dataset, CocoDetection):
        return Path(inside(dataset.coco.imgs[dataset.ids[index]]["file_name"])).with_suffix(".png").as_posix()
    return f"{index:06d}.png"


@torch.no_grad()
def evaluate(model, dataset, device, task, amp="none", workers=0, show_dir=None, show_title=(), **test):
    """The task's metric of `model` on `dataset` (segmentation: a metrics.ConfusionMatrix, detection: a
    coco_eval.CocoEvaluator), summed over all ranks. test: the task's test options (segmentation: mode, ratios,
    flip). show_dir: also write the task's pictures of each prediction there (task.show), named after the image,
    titled show_title (e.g. model and checkpoint) and the image's name."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))  # unpadded shard: every image counted exactly once
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=workers, collate_fn=task.collate,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    metric = task.metric(model, dataset)
    for index, batch in progress(zip(indices, loader), "eval", total=len(indices)):
        images, targets = to_device(batch, device)
        images = in_format(images, memory_format(device, amp))  # NHWC for bf16 on CPU
        with autocast(device, amp):
            output = task.predict(model, images, targets, **test)
        task.update(metric, index, output, targets)
        if show_dir:
            name = image_name(dataset, index)
            task.show(images, output, dataset, Path(show_dir) / name, (*show_title, f"image {name}"))
    metric.reduce_from_all_processes()
    return metric
