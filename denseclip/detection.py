"""DenseCLIP detectors (paper Sec. 4.2): the DenseCLIP backbone-with-neck on torchvision's RetinaNet.

    images -> GeneralizedRCNNTransform (keep-ratio resize, CLIP mean/std, pad to 32)     torchvision
    -> CLIP ResNet -> C2..C5, z̄, z      (clip.py; attention-pool positions CROPPED to the grid)
    s = <ẑ, t̂> / τ  (B, K, h, w)         (language.py: text features, context decoder, score map)
    C5 <- [C5, s / τ] -> FPN (mmdet's: C3..C5 -> P3..P5, P6 = conv(C5), P7 = conv(P6))
    -> RetinaHead, anchors, focal + L1 losses, box coding, NMS                          torchvision
    loss_aux = BCE(s / τ upsampled to stride 4, box targets), averaged over covered cells

Mirrors the official `DenseCLIP_RetinaNet` (detection/denseclip/denseclip.py) with mmdet 2.17's `FPN` (fpn.py);
parameter names are the official ones (`backbone.*`, `text_encoder.*`, `contexts`, `gamma`, `context_decoder.*`,
`neck.lateral_convs.0.conv.*`, `neck.fpn_convs.3.conv.*`) except the head, which is torchvision's
(`head.classification_head.*`; checkpoint.py maps mmdet's `bbox_head.*` onto it). Differences from the official
code, all listed in the README's Detection section: torchvision's resize, matcher, loss normalisation and
post-processing instead of mmdet's; anchors are mmdet's (MMDetAnchorGenerator, not torchvision's rounded ones);
the aux loss uses the logits form of the BCE and is 0, not NaN, for a batch without boxes.
Shape letters: B batch, K classes, D joint dim, h w = stride-32 grid, A anchors per position.
"""
import math
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from .clip import ModifiedResNet
from .configs import CONFIGS, DetectionConfig, check_config
from .fpn import FPN
from .language import PixelTextMatching
from .transforms import CLIP_MEAN, CLIP_STD

AUX_STRIDE = 4  # the aux targets live on the stage-1 grid (official build_seg_target: H // 4, boxes / 4)


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet 2.17's AnchorGenerator (octave_base_scale, scales_per_octave, ratios, strides) in torchvision's
    interface. torchvision's own differs in two ways: it rounds the cell anchors to integers (mmdet 2.x does
    not: 2**(1/3) scales give fractional sides), and it derives each level's stride as padded image size //
    feature size, which for P6/P7 of a size that is not a multiple of 128 is not 64/128 (800 // 13 = 61);
    mmdet uses the nominal strides. Anchors are float32 whatever the feature dtype (mmdet's too)."""

    def __init__(self, strides: Sequence[int], octave_base_scale: float, scales_per_octave: int,
                 ratios: Sequence[float]):
        scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        super().__init__(tuple(tuple(s * x for x in scales) for s in strides), (tuple(ratios),) * len(strides))
        self.strides = list(strides)
        self.cell_anchors = [self.base_anchors(s, scales, ratios) for s in strides]

    @staticmethod
    def base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
        """(R*S, 4) anchors centred on (0, 0), ratio-major as mmdet's (scale_major, center_offset 0)."""
        scales, ratios = torch.tensor(scales, dtype=torch.float32), torch.tensor(ratios, dtype=torch.float32)
        h_ratios = ratios.sqrt()
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R*S,)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)  # (R*S,)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)  # (R*S, 4)

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        levels = self.grid_anchors([f.shape[-2:] for f in feature_maps], strides)  # [(h*w*A, 4)] per level
        anchors = torch.cat(levels)  # (sum h*w*A, 4): level, then row, column, anchor (mmdet's order)
        return [anchors for _ in image_list.image_sizes]


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


class DenseCLIPRetinaNet(RetinaNet, DenseCLIPFeatures):
    """torchvision's RetinaNet with the DenseCLIP backbone-with-neck (or, with use_text False, the plain CLIP
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
        self.init_features(cfg, class_names)  # language, C5 + K channels, mmdet's FPN
        if len(cfg.anchor_strides) != cfg.fpn_num_outs:
            raise ValueError(f"{len(cfg.anchor_strides)} anchor strides for {cfg.fpn_num_outs} FPN levels")

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """torchvision's RetinaNet.forward with our features, and the aux loss on the transformed targets."""
        if self.training and targets is None:
            raise ValueError("training needs targets")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images, targets = self.transform(images, targets)  # resized, normalised, padded; boxes resized alike
        for t in targets or []:
            if (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any():
                raise ValueError("boxes must have positive width and height (x2 > x1, y2 > y1)")
        feats, score = self.extract_feat(images.tensors)
        head_outputs = self.head(feats)  # cls_logits (B, sum h*w*A, K), bbox_regression (B, sum h*w*A, 4)
        # losses and box decoding in fp32 under autocast, as mmdet's force_fp32 (bf16 boxes would be 4-8 px coarse)
        head_outputs = {k: v.float() for k, v in head_outputs.items()}
        anchors = self.anchor_generator(images, feats)
        if self.training:
            tv = self.compute_loss(targets, head_outputs, anchors)
            losses = {"loss_cls": tv["classification"], "loss_bbox": tv["bbox_regression"]}
            return {**losses, **self.aux_losses(score, targets, images.tensors.shape[-2:])}
        per_level = [f.shape[-2] * f.shape[-1] * self.anchor_generator.num_anchors_per_location()[0] for f in feats]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        detections = self.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                 images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)


def build_detector(name: str, class_names: Optional[Sequence[str]] = None, **overrides) -> DenseCLIPFeatures:
    """A named detection config (see configs.CONFIGS), with field overrides; class names default to COCO's 80.
    cfg.detector picks torchvision's RetinaNet (here) or Mask R-CNN (maskrcnn.py)."""
    cfg = replace(CONFIGS[name](), **overrides)
    if not isinstance(cfg, DetectionConfig):
        raise ValueError(f"{name!r} is not a detection config")
    if class_names is None:
        class_names = COCO_CLASSES
    if cfg.detector == "maskrcnn":
        from .maskrcnn import DenseCLIPMaskRCNN  # imports this module: a cycle if imported at the top

        return DenseCLIPMaskRCNN(cfg, class_names)
    if cfg.detector != "retinanet":
        raise ValueError(f"detector must be 'retinanet' or 'maskrcnn', not {cfg.detector!r}")
    return DenseCLIPRetinaNet(cfg, class_names)


COCO_CLASSES = (  # COCO 2017's 80 categories in sorted-id order (mmdet's CocoDataset.CLASSES)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
