"""DenseCLIP (Rao et al., CVPR 2022) in plain PyTorch: language-guided dense prediction with
context-aware prompting. The public API:

    tokenize(texts, context_length=77, truncate=False)   CLIP's BPE, ids identical to clip.tokenize
    load_clip(path_or_state_dict)                         OpenAI CLIP (.pt archive or state dict)
    build_model(name, class_names=None, **overrides)      a named segmentation config (see CONFIGS)
    load_checkpoint(model, path)                          ours, official DenseCLIP, OpenAI CLIP, ImageNet
    ZeroShotSegmenter(clip, class_names)                  raw CLIP, no training (MaskCLIP / DenseCLIP read-out)
"""
from .checkpoint import load_checkpoint
from .clip import CLIP, load_clip
from .configs import CONFIGS, DenseCLIPConfig
from .segmentor import DenseCLIP, build_model
from .tokenizer import tokenize
from .zeroshot import ZeroShotSegmenter

__all__ = ["CLIP", "CONFIGS", "DenseCLIP", "DenseCLIPConfig", "ZeroShotSegmenter", "build_model", "load_checkpoint",
           "load_clip", "tokenize"]
