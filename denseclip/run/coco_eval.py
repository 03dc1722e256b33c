"""COCO's box and mask AP (COCOeval) over the detections of every rank, with mmdet's per-class table."""
import contextlib
import copy
import io

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ..data.coco import quiet_coco
from ..precision import at_least_fp32


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval



class CocoEvaluator:
    """Box AP (and, for detections with masks, mask AP) as COCO defines it: detections become COCO results (xywh in
    original pixels, masks as RLE, the dataset's own category ids), every rank's are gathered, and COCOeval scores
    them against `dataset.coco` over exactly the images evaluated. Same interface as metrics.ConfusionMatrix:
    update, reduce_from_all_processes, compute, format_table."""

    def __init__(self, dataset):
        self.gt, self.cat_ids = dataset.coco, list(dataset.cat_ids)
        self.images = []  # (dataset index, image id, [bbox result dicts], [segm result dicts])
        self._evals, self.summaries = {}, {}

    def update(self, index: int, image_id: int, det: dict):
        """det: a detector output for one image: boxes (n, 4) xyxy, scores (n,), labels (n,) in 0..K-1, and for
        Mask R-CNN masks uint8 (n, H, W) at the image's original size (then scored with the box's score, as
        mmdet's segm results)."""
        boxes = at_least_fp32(det["boxes"].detach().cpu())
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (n, 4)
        scores, labels = at_least_fp32(det["scores"].detach().cpu()).tolist(), det["labels"].tolist()
        results = [{"image_id": image_id, "category_id": self.cat_ids[label], "bbox": box, "score": score}
                   for box, score, label in zip(xywh.tolist(), scores, labels)]
        segm = []
        if "masks" in det:
            masks = det["masks"].detach().to(torch.uint8).cpu().permute(1, 2, 0).numpy()  # (H, W, n)
            rles = mask_utils.encode(np.asfortranarray(masks)) if len(scores) else []
            for rle, score, label in zip(rles, scores, labels):
                rle["counts"] = rle["counts"].decode()  # bytes -> str: JSON-writable, as COCO files store it
                segm.append({"image_id": image_id, "category_id": self.cat_ids[label], "segmentation": rle,
                             "score": score})
        self.images.append((index, image_id, results, segm if "masks" in det else None))
        self._evals = {}

    def reduce_from_all_processes(self):
        """Gather every rank's images (unpadded shards: each image once), in dataset order on every rank, so the
        result list and COCOeval's tie-breaking do not depend on the number of processes."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.images)
            self.images = [item for part in parts for item in part]
        self.images.sort(key=lambda item: item[0])
        self._evals = {}

    @property
    def iou_types(self) -> tuple:
        """("bbox",), or ("bbox", "segm") when the detections came with masks."""
        return ("bbox", "segm") if self.images and all(item[3] is not None for item in self.images) else ("bbox",)

    @property
    def results(self) -> list:
        """The detections as a COCO results list (what eval.py --out writes)."""
        return [r for _, _, results, _ in self.images for r in results]

    @property
    def segm_results(self) -> list:
        """The masks as a COCO segm results list (RLE; what eval.py --out writes next to the boxes)."""
        return [r for _, _, _, segm in self.images for r in segm or []]

    def coco_eval(self, iou_type: str = "bbox") -> COCOeval:
        if iou_type not in self.iou_types:
            raise ValueError(f"no {iou_type!r} results to evaluate (the detections have {self.iou_types})")
        if iou_type not in self._evals:
            # loadRes adds keys to the dicts it is given: a copy
            results = copy.deepcopy(self.results if iou_type == "bbox" else self.segm_results)
            with contextlib.redirect_stdout(io.StringIO()):
                if results:
                    dt = self.gt.loadRes(results)
                else:  # loadRes cannot take an empty list: no detections at all score AP 0
                    dt = quiet_coco({"images": self.gt.dataset["images"], "annotations": [],
                                     "categories": copy.deepcopy(self.gt.dataset["categories"])})
                ev = COCOeval(self.gt, dt, iou_type)
                ev.params.imgIds = sorted(item[1] for item in self.images)
                ev.evaluate()
                ev.accumulate()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                ev.summarize()
            self.summaries[iou_type] = out.getvalue().rstrip()  # COCO's standard 12 lines
            self._evals[iou_type] = ev
        return self._evals[iou_type]

    @property
    def summary(self) -> str:
        """COCOeval's 12-line box summary."""
        self.coco_eval("bbox")
        return self.summaries["bbox"]

    def class_ap(self, iou_type: str = "bbox") -> list:
        """AP@[.5:.95] per class (area all, 100 detections), as mmdet's classwise table; nan for a class without
        ground truth."""
        precision = self.coco_eval(iou_type).eval["precision"]  # (T ious, R recalls, K classes, A areas, M dets)
        aps = []
        for k in range(len(self.cat_ids)):
            p = precision[:, :, k, 0, -1]
            aps.append(float(p[p > -1].mean()) if (p > -1).any() else float("nan"))
        return aps

    def compute(self) -> dict:
        """COCOeval's 12 box numbers (fractions; -1 where undefined) by name (STAT_NAMES) and "class_AP"; with
        masks also "segm": the same for the masks."""
        out = {}
        for iou_type in self.iou_types:
            stats = self.coco_eval(iou_type).stats
            out[iou_type] = {**{k: float(v) for k, v in zip(STAT_NAMES, stats)}, "class_AP": self.class_ap(iou_type)}
        return {**out.pop("bbox"), **out}

    def format_table(self, class_names) -> str:
        width = max(len(n) for n in class_names)
        lines = []
        for iou_type in self.iou_types:
            self.coco_eval(iou_type)
            rows = [f"{name:<{width}}  {100 * ap:6.2f}" for name, ap in zip(class_names, self.class_ap(iou_type))]
            lines += [f"{iou_type}:", self.summaries[iou_type], "", f"{'class':<{width}}  {'AP':>6}", *rows, ""]
        return "\n".join(lines[:-1])
