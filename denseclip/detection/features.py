"""The DenseCLIP part of every detector (official `detection/denseclip/denseclip.py`): the CLIP ResNet whose
attention pool crops its positional grid, the language side (text features, context decoder, score map s / τ)
joined to C5, mmdet's FPN, and the auxiliary loss: BCE of s / τ against box-filled targets.
Shape letters: B batch, K classes, D joint dim, h w = stride-32 grid.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..configs import DetectionConfig, check_config
from ..fpn import FPN
from ..language import PixelTextMatching
from ..resnet import ModifiedResNet


AUX_STRIDE = 4  # the aux targets live on the stage-1 grid (official build_seg_target: H // 4, boxes / 4)



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
    logits = F.interpolate(score.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    weight = mask.expand_as(target)  # (B, K, h, w)
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return loss / weight.sum().clamp(min=1)



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



class DenseCLIPFeatures(PixelTextMatching):
    """The DenseCLIP backbone-with-neck that every detector here shares (RetinaNet and Mask R-CNN): the CLIP ResNet
    (`self.backbone`, set by the torchvision detector's constructor), the text side (language.py), C5 <- [C5, s / τ]
    and mmdet's FPN (`self.neck`), and the auxiliary box-target loss. A base class, not a submodule, so that the
    parameters keep the official top-level names."""

    def init_features(self, cfg: DetectionConfig, class_names: Sequence[str]):
        self.cfg = cfg
        self.init_language(cfg, class_names)  # text encoder, contexts, context decoder, gamma (language.py)
        channels = list(self.backbone.out_channels)
        if cfg.use_text:
            channels[-1] += len(class_names)  # s / τ joins C5
        self.neck = FPN(channels, cfg.neck_channels, cfg.fpn_num_outs, cfg.fpn_start_level, cfg.fpn_add_extra_convs,
                        cfg.fpn_relu_before_extra_convs)

    def extract_feat(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Padded, normalised batch (B, 3, H, W) -> (FPN levels, score map s / τ (B, K, H/32, W/32) or None)."""
        feats, z_global, z_dense = self.backbone.forward_dense(x)
        score = None
        if self.cfg.use_text:
            score = self.score_map(z_global, z_dense) / self.cfg.tau  # (B, K, h, w)
            feats = feats[:-1] + [torch.cat([feats[-1], score.to(feats[-1].dtype)], dim=1)]  # (B, C5 + K, h, w)
        return self.neck(feats), score

    def aux_losses(self, score: Optional[torch.Tensor], targets, padded_size: Tuple[int, int]) -> Dict:
        """{"loss_aux": weight x box_seg_loss} on the transformed (resized) boxes; {} without language."""
        if score is None or not self.cfg.aux_loss_weight:
            return {}
        H, W = padded_size
        target, mask = box_seg_targets([t["boxes"] for t in targets], [t["labels"] for t in targets],
                                       self.num_classes, (H // AUX_STRIDE, W // AUX_STRIDE))
        return {"loss_aux": self.cfg.aux_loss_weight * box_seg_loss(score, target, mask)}
