"""DenseCLIP RetinaNet (paper Sec. 4.2, object detection): torchvision's RetinaNet with the DenseCLIP features that
both detectors share (features.py). `forward` runs, in order:

    images -> GeneralizedRCNNTransform (keep-ratio resize, CLIP mean/std, pad to 32)        torchvision
    -> image encoder: CLIP ResNet -> C2..C5, z̄, z   (resnet.py; attention-pool positions CROPPED to the grid)
    -> t (contexts, text encoder) -> t + γ · ContextDecoder(t, [z̄; z]) -> s / τ (B, K, h, w)   language.py
    -> C5 <- [C5, s / τ] -> FPN (mmdet's: C3..C5 -> P3..P5, P6 = conv(C5), P7 = conv(P6))  features.extract_feat
    -> RetinaHead, anchors, focal + L1 losses, box coding, NMS                             torchvision
    + loss_aux = BCE(s / τ upsampled to stride 4, box targets), averaged over covered cells  features.aux_losses

Mirrors the official `DenseCLIP_RetinaNet` (detection/denseclip/denseclip.py) with mmdet 2.17's `FPN` (fpn.py);
parameter names are the official ones (`backbone.*`, `text_encoder.*`, `contexts`, `gamma`, `context_decoder.*`,
`neck.lateral_convs.0.conv.*`, `neck.fpn_convs.3.conv.*`) except the head, which is torchvision's
(`head.classification_head.*`; checkpoint.py maps mmdet's `bbox_head.*` onto it). Differences from the official
code, all listed in the README's Detection section: torchvision's resize, matcher, loss normalisation and
post-processing instead of mmdet's; anchors are mmdet's (MMDetAnchorGenerator, not torchvision's rounded ones);
the aux loss uses the logits form of the BCE and is 0, not NaN, for a batch without boxes.
Shape letters: B batch, K classes, D joint dim, h w = stride-32 grid, A anchors per position.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

from ..clip import CLIP_MEAN, CLIP_STD
from ..configs import DetectionConfig
from ..precision import at_least_fp32
from .anchors import MMDetAnchorGenerator
from .features import add_text_and_neck, aux_losses, clip_backbone, extract_feat, transform


class DenseCLIPRetinaNet(RetinaNet):
    """torchvision's RetinaNet with the DenseCLIP features (or, with use_text False, the plain CLIP
    ResNet + FPN baseline). train: model(images, targets) -> {loss_cls, loss_bbox[, loss_aux]}; eval:
    model(images) -> [{boxes, scores, labels}] in each image's own pixels (see the detection contract)."""

    task = "detection"

    def __init__(self, cfg: DetectionConfig, class_names: Sequence[str]):
        backbone = clip_backbone(cfg)
        anchors = MMDetAnchorGenerator(cfg.anchor_strides, cfg.octave_base_scale, cfg.scales_per_octave,
                                       cfg.anchor_ratios)
        K = len(class_names)
        head = RetinaNetHead(cfg.neck_channels, anchors.num_anchors_per_location()[0], K)
        super().__init__(backbone, K, min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(CLIP_MEAN),
                         image_std=list(CLIP_STD), anchor_generator=anchors, head=head,
                         score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                         detections_per_img=cfg.detections_per_img, fg_iou_thresh=cfg.fg_iou_thresh,
                         bg_iou_thresh=cfg.bg_iou_thresh, topk_candidates=cfg.topk_candidates,
                         size_divisible=cfg.size_divisible)
        add_text_and_neck(self, cfg, class_names)  # cfg, language side, mmdet's FPN on C2..C5 + s / τ
        if len(cfg.anchor_strides) != cfg.fpn_num_outs:
            raise ValueError(f"{len(cfg.anchor_strides)} anchor strides for {cfg.fpn_num_outs} FPN levels")

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """torchvision's RetinaNet.forward with the DenseCLIP features, and the aux loss on the transformed targets."""
        if self.training and targets is None:
            raise ValueError("training needs targets")
        images, targets, original_sizes = transform(self, images, targets)
        feats, score = extract_feat(self, images.tensors)  # P3..P7, s / τ (B, K, h, w)
        head_outputs = self.head(feats)  # cls_logits (B, sum h*w*A, K), bbox_regression (B, sum h*w*A, 4)
        # losses and box decoding in at least fp32 under autocast, as mmdet's force_fp32 (bf16 boxes would be 4-8 px
        # coarse), but promoted: a float64 model decodes in float64
        head_outputs = {k: at_least_fp32(v) for k, v in head_outputs.items()}
        anchors = self.anchor_generator(images, feats)
        if self.training:
            tv = self.compute_loss(targets, head_outputs, anchors)
            losses = {"loss_cls": tv["classification"], "loss_bbox": tv["bbox_regression"]}
            return {**losses, **aux_losses(self.cfg, score, targets, images.tensors.shape[-2:])}
        per_level = [f.shape[-2] * f.shape[-1] * self.anchor_generator.num_anchors_per_location()[0] for f in feats]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        detections = self.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                 images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)
