"""DenseCLIP Mask R-CNN (paper Sec. 4.2, instance segmentation): torchvision's MaskRCNN with the DenseCLIP features
that both detectors share (features.py). `forward` runs, in order:

    images -> GeneralizedRCNNTransform (keep-ratio resize of images, boxes and masks; CLIP mean/std; pad to 32)
    -> image encoder, t with contexts, γ · context decoder, s / τ into C5, mmdet's FPN: P2..P6, P6 = max_pool(P5, 1,
       stride 2)                                                                           features.extract_feat
    -> RPN (3x3 conv, objectness, deltas; mmdet anchors 8 x stride over strides 4..64)     torchvision RPN
    -> RoIAlign 7x7 / 14x14 from P2..P5 (mmdet's level rule, aligned=True: MMDetRoIAlign)
    -> two shared fcs -> class scores and class-specific deltas; 4 convs + 2x deconv -> 28x28 mask logits
    + loss_aux = the box-target BCE of s / τ (as RetinaNet's)                               features.aux_losses

Mirrors the official `DenseCLIP_MaskRCNN` (detection/denseclip/denseclip.py) with mmdet 2.17's mask_rcnn_r50_fpn
(RPNHead, Shared2FCBBoxHead, FCNMaskHead, SingleRoIExtractor). Backbone, text side, FPN keep the official names;
the heads are torchvision's (`rpn.head.*`, `roi_heads.*`; checkpoint.mmdet_maskrcnn_heads_to_ours maps mmdet's
`rpn_head.*` / `roi_head.*` onto them, background class moved from mmdet's last index to torchvision's 0).
What torchvision computes differently from mmdet (sampling, losses, mask targets and pasting) is listed in the
README's Mask R-CNN section. Class labels are 0..K-1 outside (the detection contract), 1..K inside torchvision.
Shape letters: B batch, K classes, R RoIs, C channels, S RoI output side.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ..clip import CLIP_MEAN, CLIP_STD
from ..configs import DetectionConfig
from ..precision import wide_dtype
from .anchors import MMDetAnchorGenerator
from .features import add_text_and_neck, aux_losses, clip_backbone, extract_feat, transform

BOX_ROI_SIZE, MASK_ROI_SIZE = 7, 14  # mmdet's bbox / mask roi_layer output_size (the mask head upsamples to 28)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet 2.17's SingleRoIExtractor + RoIAlign(aligned=True) in torchvision's MultiScaleRoIAlign interface.
    An RoI of scale s = sqrt(w h) is pooled from level floor(log2(s / finest_scale + 1e-6)), clamped to the given
    strides (56 -> P2 below 112 px, P3 below 224, P4 below 448, P5 above). torchvision's MultiScaleRoIAlign picks
    the same levels (k0 4, s0 224) up to where its 1e-6 sits, but samples with aligned=False (pixel centres off
    by half a pixel) and infers each level's stride from the first batch it sees. (A subclass only because
    torchvision's detectors insist on that type.)"""

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int, sampling_ratio: int,
                 finest_scale: int):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.strides, self.finest_scale, self.size = list(strides), finest_scale, output_size

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        """(R, 4) xyxy boxes -> (R,) level index in 0..len(strides)-1 (mmdet's map_roi_levels)."""
        scale = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).sqrt()
        return (scale / self.finest_scale + 1e-6).log2().floor().clamp(0, len(self.strides) - 1).long()

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
        level = self.levels(rois[:, 1:])
        S = self.size
        out = feats[0].new_zeros(len(rois), feats[0].shape[1], S, S)  # (R, C, S, S)
        for i, (f, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.nonzero(level == i).squeeze(1)
            if len(idx):
                out[idx] = roi_align(f, rois[idx], (S, S), 1 / stride, self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class PromotingRPN(RegionProposalNetwork):
    """torchvision's RPN with its objectness labels in the logits' dtype, at least fp32. torchvision makes them fp32,
    and a BCE of float64 logits against fp32 labels runs in fp32: the one loss of a float64 model that would not be
    float64. Under autocast and in fp32 nothing changes (0 / 1 labels are exact)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        labels = [lb.to(wide_dtype(objectness.dtype)) for lb in labels]
        return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)


class DenseCLIPMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN with the DenseCLIP features (or, with use_text False, the plain CLIP ResNet
    + FPN baseline). train: model(images, targets with masks) -> {loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox,
    loss_mask[, loss_aux]}; eval: model(images) -> [{boxes, scores, labels, masks}], boxes in each image's own
    pixels, masks uint8 (n, H, W) at its size (probability >= cfg.mask_thresh)."""

    task = "detection"

    def __init__(self, cfg: DetectionConfig, class_names: Sequence[str]):
        if cfg.fpn_num_outs != len(cfg.anchor_strides) or len(cfg.roi_strides) > cfg.fpn_num_outs:
            raise ValueError(f"{cfg.fpn_num_outs} FPN levels for {len(cfg.anchor_strides)} anchor strides and "
                             f"{len(cfg.roi_strides)} RoI strides")
        K, C = len(class_names), cfg.neck_channels
        anchors = MMDetAnchorGenerator(cfg.anchor_strides, cfg.octave_base_scale, cfg.scales_per_octave,
                                       cfg.anchor_ratios)
        names = [str(i) for i in range(len(cfg.roi_strides))]  # the FPN levels RoIs are pooled from
        super().__init__(
            clip_backbone(cfg), num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), size_divisible=cfg.size_divisible,
            rpn_anchor_generator=anchors, rpn_head=RPNHead(C, anchors.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test, rpn_nms_thresh=cfg.rpn_nms_thresh,
            rpn_fg_iou_thresh=cfg.fg_iou_thresh, rpn_bg_iou_thresh=cfg.bg_iou_thresh,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, rpn_positive_fraction=cfg.rpn_positive_fraction,
            rpn_score_thresh=0.0,  # mmdet's RPN keeps proposals of any score
            box_roi_pool=MMDetRoIAlign(names, cfg.roi_strides, BOX_ROI_SIZE, cfg.roi_sampling_ratio,
                                       cfg.roi_finest_scale),
            box_head=TwoMLPHead(C * BOX_ROI_SIZE ** 2, cfg.box_fc_channels),
            box_predictor=FastRCNNPredictor(cfg.box_fc_channels, K + 1),  # + background (torchvision's class 0)
            box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img, box_fg_iou_thresh=cfg.box_fg_iou_thresh,
            box_bg_iou_thresh=cfg.box_bg_iou_thresh, box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_positive_fraction=cfg.box_positive_fraction,
            mask_roi_pool=MMDetRoIAlign(names, cfg.roi_strides, MASK_ROI_SIZE, cfg.roi_sampling_ratio,
                                        cfg.roi_finest_scale),
            mask_head=MaskRCNNHeads(C, [cfg.mask_conv_channels] * 4, 1),  # 4 3x3 convs, dilation 1
            mask_predictor=MaskRCNNPredictor(cfg.mask_conv_channels, cfg.mask_conv_channels, K + 1))
        add_text_and_neck(self, cfg, class_names)  # cfg, language side, mmdet's FPN on C2..C5 + s / τ
        self.rpn.__class__ = PromotingRPN  # torchvision builds its RPN itself; only compute_loss differs
        for conv in self.rpn.head.modules():  # mmdet's RPNHead init: normal(0, 0.01), zero bias (torchvision: same)
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """torchvision's GeneralizedRCNN.forward with the DenseCLIP features, labels shifted to torchvision's 1..K,
        and the aux loss on the transformed targets."""
        if self.training:
            if targets is None or any("masks" not in t for t in targets):
                raise ValueError("Mask R-CNN training needs targets with masks (build the dataset with masks=True)")
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]  # 0 is torchvision's background
        images, targets, original_sizes = transform(self, images, targets)  # boxes and masks resized alike
        levels, score = extract_feat(self, images.tensors)  # P2..P6, s / τ (B, K, h, w)
        features = OrderedDict((str(i), f) for i, f in enumerate(levels))  # P2..P6 under torchvision's names
        proposals, rpn_losses = self.rpn(images, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        if self.training:
            aux_targets = [{**t, "labels": t["labels"] - 1} for t in targets]
            return {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_bbox": rpn_losses["loss_rpn_box_reg"],
                    "loss_cls": roi_losses["loss_classifier"], "loss_bbox": roi_losses["loss_box_reg"],
                    "loss_mask": roi_losses["loss_mask"],
                    **aux_losses(self.cfg, score, aux_targets, images.tensors.shape[-2:])}
        detections = self.transform.postprocess(detections, images.image_sizes, original_sizes)
        for d in detections:
            d["labels"] = d["labels"] - 1
            d["masks"] = (d["masks"][:, 0] >= self.cfg.mask_thresh).to(torch.uint8)  # (n, H, W)
        return detections
