"""Semantic-segmentation metrics from a confusion matrix: aAcc, mAcc, mIoU and the per-class table.

Mirrors torchvision's references/segmentation `ConfusionMatrix` (a bincount per batch, summed across processes
with one all_reduce), with mmseg's definitions of the numbers: IoU = intersect / union and Acc = intersect /
label area, NaN for a class whose denominator is zero, and the means are nan-means over classes. So a class absent
from the ground truth but predicted somewhere counts with IoU 0, and a class absent from both is left out.
Differences from torchvision: pixels whose target is `ignore_index` are skipped explicitly, any other target or
prediction outside 0..K-1 is an error instead of being dropped silently, and `compute` returns plain numbers.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """mat[t, p] counts pixels of ground-truth class t predicted as class p."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer class indices of the same shape (any shape)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        n = self.num_classes
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= n):
            raise ValueError(f"target values must be in 0..{n - 1} or {self.ignore_index} (ignore), got "
                             f"{t.unique()[:10].tolist()}")
        if p.numel() and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"predicted classes must be in 0..{n - 1}, got {p.unique()[:10].tolist()}")
        self.mat = self.mat.to(t.device)  # counts live where the predictions are: one bincount, no transfer
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def reset(self) -> None:
        self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over all ranks; every rank must call it (a no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl" and self.mat.device.type != "cuda":
            self.mat = self.mat.cuda()  # NCCL reduces only CUDA tensors, even for a rank that saw no pixels
        dist.all_reduce(self.mat)

    def compute(self) -> dict:
        """{'aAcc', 'mAcc', 'mIoU'} as fractions in [0, 1], and per-class lists 'IoU', 'Acc' (NaN where undefined)."""
        h = self.mat.double().cpu()
        intersect = h.diag()
        label_area, pred_area = h.sum(1), h.sum(0)
        union = label_area + pred_area - intersect
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, intersect / union.clamp(min=1), nan)
        acc = torch.where(label_area > 0, intersect / label_area.clamp(min=1), nan)
        total = label_area.sum()
        return {
            "aAcc": (intersect.sum() / total).item() if total > 0 else math.nan,
            "mAcc": acc.nanmean().item(),  # NaN when no class has a defined value
            "mIoU": iou.nanmean().item(),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }

    def format_table(self, class_names=None) -> str:
        """Per-class IoU/Acc in percent, then the summary line (mmseg's layout, as plain text)."""
        res = self.compute()
        names = [str(c).strip() for c in class_names] if class_names is not None else \
            [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        width = max(8, *(len(c) for c in names))
        lines = [f"{'Class':<{width}} {'IoU':>7} {'Acc':>7}"]
        for name, iou, acc in zip(names, res["IoU"], res["Acc"]):
            lines.append(f"{name:<{width}} {100 * iou:>7.2f} {100 * acc:>7.2f}")
        lines.append(f"aAcc {100 * res['aAcc']:.2f}  mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}")
        return "\n".join(lines)
