"""The DenseCLIP part of every detector (official `detection/denseclip/denseclip.py`), as functions both detectors
call: the CLIP ResNet whose attention pool crops its positional grid (`clip_backbone`), the language side and
mmdet's FPN on C2..C5 + s / τ (`add_text_and_neck`), the feature path (`extract_feat`: image encoder -> text features
with contexts -> context decoder and γ -> s / τ -> concatenation to C5 -> FPN), and the auxiliary loss: BCE of s / τ
against box-filled targets (`aux_losses`, Sec. 3.4); and torchvision's input transform with a check of the boxes
(`transform`).
Shape letters: B batch, K classes, D joint dim, h w = stride-32 grid.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import language
from ..configs import DetectionConfig, check_config
from ..fpn import FPN
from ..precision import at_least_fp32
from ..resnet import ModifiedResNet

AUX_STRIDE = 4  # the aux targets live on the stage-1 grid (official build_seg_target: H // 4, boxes / 4)


def clip_backbone(cfg: DetectionConfig) -> ModifiedResNet:
    """The detectors' image encoder: CLIP's ResNet, its attention pool cropping (not resizing) its positions."""
    check_config(cfg)  # types and fixed value sets, named in the error
    if cfg.backbone != "resnet":
        raise ValueError(f"detection supports the CLIP ResNet backbone only, not {cfg.backbone!r}")
    padded = math.ceil(cfg.max_size / cfg.size_divisible) * cfg.size_divisible
    if cfg.use_text and cfg.crop_pos_embed and cfg.input_resolution < padded:
        raise ValueError(f"input_resolution {cfg.input_resolution} must cover max_size {cfg.max_size} padded to "
                         f"{padded}: the attention pool crops its positional grid to the feature grid")
    return ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.input_resolution, cfg.vision_width,
                          crop_pos_embed=cfg.crop_pos_embed)


def add_text_and_neck(model: nn.Module, cfg: DetectionConfig, class_names: Sequence[str]):
    """Give a detector (its `backbone` already set by torchvision's constructor) its config, the language side
    (language.add_language: text_encoder, texts, contexts, context_decoder, gamma) and mmdet's FPN as `neck`, whose
    C5 input has K more channels for s / τ. The parameters keep the official top-level names."""
    model.cfg = cfg
    language.add_language(model, cfg, class_names)
    channels = list(model.backbone.out_channels)
    if cfg.use_text:
        channels[-1] += model.num_classes  # s / τ joins C5
    model.neck = FPN(channels, cfg.neck_channels, cfg.fpn_num_outs, cfg.fpn_start_level, cfg.fpn_add_extra_convs,
                     cfg.fpn_relu_before_extra_convs)


def extract_feat(model: nn.Module, x: torch.Tensor) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """A detector's features: padded, normalised batch (B, 3, H, W) -> (FPN levels, s / τ (B, K, H/32, W/32) or
    None). Unlike the segmentor, s / τ (not s) joins C5, as in the official detectors."""
    feats, z_global, z_dense = model.backbone.forward_dense(x)  # C2..C5, z̄ (B, D), z (B, D, h, w)
    score = None
    if model.cfg.use_text:
        text = language.context_aware_text(model, z_global, z_dense)  # t (B, K, D): contexts, γ · decoder
        score = language.score_map(z_dense, text) / model.cfg.tau  # s / τ (B, K, h, w)
        feats[-1] = torch.cat([feats[-1], score.to(feats[-1].dtype)], dim=1)  # (B, C5 + K, h, w)
    return model.neck(feats), score


def transform(model: nn.Module, images: List[torch.Tensor], targets=None):
    """torchvision's GeneralizedRCNNTransform (`model.transform`): images (and boxes, masks) resized keeping the
    aspect ratio, normalised with CLIP's mean/std and padded into one batch. -> (ImageList, targets, the images'
    original sizes). A box without positive width and height is an error."""
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    images, targets = model.transform(images, targets)
    for t in targets or []:
        if (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any():
            raise ValueError("boxes must have positive width and height (x2 > x1, y2 > y1)")
    return images, targets, original_sizes


def box_seg_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int,
                    size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official build_seg_target on the (h, w) = stride-4 grid: each box divided by 4, truncated to int and
    clamped to the grid, then `target[k, y1:y2, x1:x2] = 1` for its class k and `mask[y1:y2, x1:x2] = 1` (end-
    exclusive: a box narrower than 4 px, or at the far border, covers no cell). -> (B, K, h, w), (B, 1, h, w)."""
    h, w = size
    target = torch.zeros(len(boxes), num_classes, h, w, device=boxes[0].device)
    mask = torch.zeros(len(boxes), 1, h, w, device=boxes[0].device)
    for i, (b, k) in enumerate(zip(boxes, labels)):
        b = (b / AUX_STRIDE).long()
        b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
        b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
        for (x1, y1, x2, y2), label in zip(b.tolist(), k.tolist()):
            target[i, label, y1:y2, x1:x2] = 1
            mask[i, :, y1:y2, x1:x2] = 1
    return target, mask


def box_seg_loss(score: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official compute_seg_loss: BCE of the score map s / τ (B, K, h', w'), bilinearly upsampled to the
    targets' grid, summed over covered cells of every class and divided by K x covered cells. Logits form (the
    official sigmoid-then-BCE loses precision in fp16 and for large scores); 0 when no cell is covered."""
    logits = F.interpolate(at_least_fp32(score), size=target.shape[-2:], mode="bilinear", align_corners=False)
    target, weight = target.to(logits.dtype), mask.expand_as(target).to(logits.dtype)  # (B, K, h, w)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return loss / weight.sum().clamp(min=1)


def aux_losses(cfg: DetectionConfig, score: Optional[torch.Tensor], targets, padded_size: Tuple[int, int]) -> Dict:
    """{"loss_aux": weight x box_seg_loss} on the transformed (resized) boxes, labels 0..K-1; {} without language."""
    if score is None or not cfg.aux_loss_weight:
        return {}
    H, W = padded_size
    target, mask = box_seg_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], score.shape[1],
                                   (H // AUX_STRIDE, W // AUX_STRIDE))
    return {"loss_aux": cfg.aux_loss_weight * box_seg_loss(score, target, mask)}
