"""DenseCLIP detectors (paper Sec. 4.2) on torchvision's RetinaNet (retinanet.py) and Mask R-CNN (maskrcnn.py), with
mmdet 2.17's anchors (anchors.py) and the DenseCLIP features and box-target auxiliary loss they share, as functions
(features.py). `build_detector(name, class_names)` builds a named detection config (configs.py)."""
from dataclasses import replace
from typing import Sequence

from ..configs import CONFIGS, DetectionConfig
from .maskrcnn import DenseCLIPMaskRCNN
from .retinanet import DenseCLIPRetinaNet


def build_detector(name: str, class_names: Sequence[str], **overrides):
    """A named detection config (see configs.CONFIGS), with field overrides. cfg.detector picks torchvision's
    RetinaNet (retinanet.py) or Mask R-CNN (maskrcnn.py)."""
    cfg = replace(CONFIGS[name](), **overrides)
    if not isinstance(cfg, DetectionConfig):
        raise ValueError(f"{name!r} is not a detection config")
    if cfg.detector == "maskrcnn":
        return DenseCLIPMaskRCNN(cfg, class_names)
    if cfg.detector != "retinanet":
        raise ValueError(f"detector must be 'retinanet' or 'maskrcnn', not {cfg.detector!r}")
    return DenseCLIPRetinaNet(cfg, class_names)
