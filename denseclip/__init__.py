"""DenseCLIP (Rao et al., CVPR 2022) in plain PyTorch: language-guided dense prediction with
context-aware prompting. The public API:

    tokenize(texts, context_length=77, truncate=False)   CLIP's BPE, ids identical to clip.tokenize
    load_clip(path_or_state_dict)                         OpenAI CLIP (.pt archive or state dict)
    build_model(name, class_names=None, **overrides)      a named config (see CONFIGS): segmentor or detector
    task_of(name)                                         "segmentation" or "detection", without building
    load_checkpoint(model, path)                          ours, official DenseCLIP, OpenAI CLIP, ImageNet
    ZeroShotSegmenter(clip, class_names, cfg)             raw CLIP, no training (vanilla, MaskCLIP, SCLIP, ClearCLIP,
                                                          NACLIP read-outs; the papers' protocol)

The package has three layers, imports pointing only downward: the method (this folder and detection/), the data
(data/) and running (run/: training and evaluation pieces under train.py, eval.py, demo.py). This file is the
facade: it is the one place of the method that reaches into data/, for the default class names.
"""
from typing import Optional, Sequence

from .checkpoint import load_checkpoint, load_clip
from .clip import CLIP
from .configs import CONFIGS, DenseCLIPConfig, DetectionConfig, task_of
from .segmentor import DenseCLIP, build_segmentor
from .tokenizer import tokenize
from .zeroshot import ZeroShotConfig, ZeroShotSegmenter


def build_model(name: str, class_names: Optional[Sequence[str]] = None, **overrides):
    """The model of a named config, with field overrides. Segmentation class names default to ADE20K's 150,
    detection ones to COCO's 80. Every model has .task, .cfg, .class_names and .num_classes."""
    from .data.classes import ADE20K_CLASSES, COCO_CLASSES

    if task_of(name) == "detection":
        from .detection import build_detector  # imports torchvision's detection package only when needed

        return build_detector(name, COCO_CLASSES if class_names is None else class_names, **overrides)
    return build_segmentor(name, ADE20K_CLASSES if class_names is None else class_names, **overrides)


__all__ = ["CLIP", "CONFIGS", "DenseCLIP", "DenseCLIPConfig", "DetectionConfig", "ZeroShotConfig",
           "ZeroShotSegmenter", "build_model", "load_checkpoint", "load_clip", "task_of", "tokenize"]
