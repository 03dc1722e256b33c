"""Named model configs, mirroring the official DenseCLIP segmentation and detection configs.

One dataclass per model family (`DenseCLIPConfig`: segmentation; `DetectionConfig`: detection), both holding the
fields of `LanguageConfig` (CLIP weights, joint dimension, text encoder, contexts, prompting, tau), with a comment
per field; each named config is a plain function returning one. No registry and no mmcv-style `_base_` files: what
a name builds is written out below. Overrides go through `dataclasses.replace`, so an unknown field is an error
rather than a silent no-op (the official configs carry keys such as `style='pytorch'` or `outdim=` that nothing
reads), and `check_config` (called when a model is built) refuses values of the wrong type, outside a field's fixed
set, or that some other field would silently ignore.
"""
import ast
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union, get_args, get_origin

from .errors import ConfigError


@dataclass
class LanguageConfig:
    """The fields every DenseCLIP model shares: the frozen text encoder with its learnable contexts, context-aware
    prompting and the score map's temperature (language.py reads them). Each model family below adds its image
    encoder, neck, head and losses; the fields stay flat, so `cfg.use_text` and `--set use_text=False` work alike."""
    clip_weights: Optional[str] = None  # OpenAI CLIP file the official recipe starts from (pretrained/<name>)
    embed_dim: Optional[int] = 1024  # joint text-image dimension D; None: no attention pool, no text (baselines)
    # --- text encoder (frozen) and learnable contexts
    use_text: bool = True  # False: the plain-FPN CLIP baseline (no text, no score map, no aux loss)
    class_token_length: int = 5  # SOT + up to 3 BPE tokens + EOT per class name (official context_length=5)
    num_contexts: int = 8  # learnable context vectors (CoOp); official: 13 text positions - 5 = 8
    truncate_class_names: bool = False  # cut names longer than the budget instead of raising
    text_width: int = 512  # CLIP's text transformer width (also the width of a context vector)
    text_heads: int = 8  # CLIP's text transformer heads
    text_layers: int = 12  # CLIP's text transformer depth
    vocab_size: int = 49408  # CLIP's BPE vocabulary
    freeze_text_encoder: bool = True  # requires_grad_(False); the contexts still learn through it
    freeze_token_embedding: bool = False  # with freeze_text_encoder off: keep the BPE table (vocab x width) frozen
    # --- context-aware prompting
    prompting: str = "post"  # "post" (t + γ·decoder(t, [z̄; z])), "pre" (visual prompt into the text encoder), "none"
    decoder_width: int = 256  # context decoder width: text and visual tokens are projected down to it
    decoder_heads: int = 4  # context decoder attention heads
    decoder_layers: int = 3  # context decoder layers
    decoder_dropout: float = 0.1  # dropout after the decoder's attention and MLP (official: 0.1)
    gamma_init: float = 1e-4  # small: start from CLIP's own text features, let the visual context in slowly
    # --- score map
    tau: float = 0.07  # CLIP's temperature: the auxiliary loss reads s / tau (detection also joins s / tau to C5)


@dataclass
class DenseCLIPConfig(LanguageConfig):
    """DenseCLIP segmentors (official `segmentation/`, mmseg 0.19): the language fields of LanguageConfig and these."""
    # --- image encoder
    backbone: str = "resnet"  # "resnet" (CLIP ModifiedResNet), "vit" (CLIP ViT), "torchvision_resnet50" (ImageNet)
    vision_layers: Union[Tuple[int, ...], int] = (3, 4, 6, 3)  # blocks per ResNet stage, or ViT depth
    vision_width: int = 64  # ResNet stem width (stage widths are 4x, 8x, 16x, 32x) or ViT width
    vision_heads: int = 32  # attention-pool heads (official: hard-coded 32 = CLIP's width*32//64) or ViT heads
    patch_size: int = 16  # ViT only
    input_resolution: int = 512  # the grid the positional embeddings are stored at (= training crop)
    drop_path_rate: float = 0.0  # ViT stochastic depth (0.1 in the official DenseCLIP ViT-B config)
    vit_out_indices: Tuple[int, ...] = (3, 5, 7, 11)  # ViT blocks feeding the 4-level pyramid
    add_class_embedding_twice: bool = False  # official ViT quirk (issue #20); on to reproduce its checkpoints
    # --- score map, neck, head, losses
    score_concat_index: int = 3  # pyramid level that gets the K score channels (2 for ViT: stride 16)
    aux_loss_weight: float = 0.4  # weight of the identity (score map) loss, official value
    neck_channels: int = 256  # FPN output channels
    head_channels: int = 256  # Semantic-FPN head channels
    head_dropout: float = 0.1  # Dropout2d before the head's classifier (mmseg's dropout_ratio)
    ignore_index: int = 255  # label value that no loss and no metric counts
    # --- inference
    test_mode: str = "slide"  # "slide" or "whole"
    test_crop: int = 512  # slide window side
    test_stride: int = 341  # slide window step (2/3 of the crop: the official 512 / 341)


def denseclip_r50():
    return DenseCLIPConfig(clip_weights="RN50.pt")


def denseclip_r101():
    return DenseCLIPConfig(vision_layers=(3, 4, 23, 3), embed_dim=512, clip_weights="RN101.pt")


def denseclip_vitb16():
    return DenseCLIPConfig(backbone="vit", vision_layers=12, vision_width=768, vision_heads=12, input_resolution=640,
                           embed_dim=512, drop_path_rate=0.1, add_class_embedding_twice=True, score_concat_index=2,
                           test_crop=640, test_stride=426, clip_weights="ViT-B-16.pt")


def _baseline(cfg):
    """The CLIP baseline of a DenseCLIP config (segmentation or detection): the same image encoder, no language."""
    cfg.use_text, cfg.embed_dim, cfg.prompting = False, None, "none"
    return cfg


def fpn_clip_r50():
    return _baseline(denseclip_r50())


def fpn_clip_r101():
    return _baseline(denseclip_r101())


def fpn_clip_vitb16():
    cfg = _baseline(denseclip_vitb16())
    cfg.drop_path_rate = 0.0  # the official baseline config sets none
    return cfg


def denseclip_imagenet_r50():
    # Any backbone (official issues #7, #47): an ImageNet ResNet-50 with a fresh attention pool projecting
    # to the text space; as in the official code, the text encoder is CLIP ViT-B/16's (D = 512).
    return DenseCLIPConfig(backbone="torchvision_resnet50", embed_dim=512,
                           clip_weights="ViT-B-16.pt")


# The tiny models' text encoder is random, not CLIP's: behind the contexts (std 1) it maps the class names (BPE rows
# of std 0.02) to nearly one direction (mean cosine between the 8 names 0.945-0.995 at seeds 1-4, 0.75 at seed 0),
# so the score map's channels are near copies of each other. The tiny recipes therefore train it, all but its
# 49408-row BPE table (training the table too: 1.45x the step time, no better at seeds 1 and 4). A CLIP text
# encoder stays frozen, as officially.
TINY_TEXT = dict(text_width=128, text_heads=2, text_layers=2, freeze_text_encoder=False, freeze_token_embedding=True)


def denseclip_tiny():
    # CPU-sized: trains on the built-in procedural data in minutes on 2 cores.
    return DenseCLIPConfig(vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, input_resolution=128,
                           embed_dim=64, **TINY_TEXT, decoder_width=32, decoder_heads=2, decoder_layers=1,
                           neck_channels=32, head_channels=32, test_mode="whole", test_crop=128, test_stride=85)


def fpn_tiny():
    return _baseline(denseclip_tiny())


@dataclass
class DetectionConfig(LanguageConfig):
    """DenseCLIP detectors (official `detection/`, mmdet 2.17) on torchvision's RetinaNet or Mask R-CNN: the language
    fields of LanguageConfig and these."""
    detector: str = "retinanet"  # "retinanet" (torchvision RetinaNet) or "maskrcnn" (torchvision MaskRCNN)
    # --- image encoder: CLIP ModifiedResNet (the only image encoder of the official detection code)
    backbone: str = "resnet"  # "resnet" only
    vision_layers: Tuple[int, ...] = (3, 4, 6, 3)  # blocks per ResNet stage
    vision_width: int = 64  # ResNet stem width (stage widths are 4x, 8x, 16x, 32x)
    vision_heads: int = 32  # attention-pool heads (official: hard-coded 32)
    input_resolution: int = 1344  # attention-pool positional grid 42 x 42: max_size 1333 padded to a multiple of 32
    crop_pos_embed: bool = True  # official detection: crop the stored grid to the feature grid (not resize it)
    # --- auxiliary loss
    aux_loss_weight: float = 1.0  # official seg_loss: box-target BCE on s / tau, weight 1
    # --- neck: mmdet's FPN
    neck_channels: int = 256  # FPN output channels
    fpn_start_level: int = 1  # RetinaNet: laterals from C3..C5 (C2 unused)
    fpn_num_outs: int = 5  # P3..P7 (strides 8..128)
    fpn_add_extra_convs: str = "on_input"  # P6 = stride-2 3x3 conv on C5 (+ scores), P7 on P6; "": max pool
    fpn_relu_before_extra_convs: bool = False  # mmdet's default, kept by the official RetinaNet config
    # --- anchors (mmdet AnchorGenerator) and their training assignment (MaxIoUAssigner): RetinaNet's head, or
    # Mask R-CNN's RPN
    anchor_strides: Tuple[int, ...] = (8, 16, 32, 64, 128)  # one per FPN output
    octave_base_scale: float = 4.0  # anchor side = stride x 4 x 2^(i/3): 32..813 px over P3..P7
    scales_per_octave: int = 3
    anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    fg_iou_thresh: float = 0.5  # pos_iou_thr
    bg_iou_thresh: float = 0.4  # neg_iou_thr; in between: ignored
    # --- Mask R-CNN only (mmdet's mask_rcnn_r50_fpn train_cfg / test_cfg): RPN proposals
    rpn_batch_size_per_image: int = 256  # rpn sampler num: anchors sampled per image for the RPN losses
    rpn_positive_fraction: float = 0.5  # rpn sampler pos_fraction
    rpn_pre_nms_top_n_train: int = 2000  # rpn_proposal nms_pre (per level)
    rpn_post_nms_top_n_train: int = 1000  # rpn_proposal max_per_img
    rpn_pre_nms_top_n_test: int = 1000  # test rpn nms_pre (per level)
    rpn_post_nms_top_n_test: int = 1000  # test rpn max_per_img
    rpn_nms_thresh: float = 0.7  # rpn nms iou_threshold
    # --- Mask R-CNN only: RoI heads (Shared2FCBBoxHead, FCNMaskHead, SingleRoIExtractor)
    roi_strides: Tuple[int, ...] = (4, 8, 16, 32)  # featmap_strides: RoIs are pooled from P2..P5 (not P6)
    roi_finest_scale: int = 56  # an RoI of side s is pooled from level floor(log2(s / 56)), clamped to P2..P5
    roi_sampling_ratio: int = 0  # RoIAlign sampling points per bin side; 0: adaptive, ceil(RoI bin size)
    box_fc_channels: int = 1024  # fc_out_channels of the two shared fcs
    mask_conv_channels: int = 256  # FCNMaskHead conv_out_channels (4 convs, then a 2x deconv)
    box_fg_iou_thresh: float = 0.5  # rcnn assigner pos_iou_thr
    box_bg_iou_thresh: float = 0.5  # rcnn assigner neg_iou_thr
    box_batch_size_per_image: int = 512  # rcnn sampler num: RoIs per image for the box and mask losses
    box_positive_fraction: float = 0.25  # rcnn sampler pos_fraction
    mask_thresh: float = 0.5  # mask_thr_binary: a pasted mask probability >= this is the object
    # --- input: torchvision's GeneralizedRCNNTransform (keep-ratio resize, CLIP mean/std, pad)
    min_size: int = 800  # shorter side (mmdet img_scale (1333, 800))
    max_size: int = 1333  # longer side cap
    size_divisible: int = 32  # pad to a multiple of the coarsest backbone stride
    # --- test time: mmdet test_cfg of the official RetinaNet config (Mask R-CNN: its rcnn test_cfg, same values)
    score_thresh: float = 0.05  # score_thr
    nms_thresh: float = 0.5  # nms iou_threshold
    topk_candidates: int = 1000  # nms_pre (per level)
    detections_per_img: int = 100  # max_per_img


def retinanet_denseclip_r50():
    return DetectionConfig(clip_weights="RN50.pt")


def retinanet_denseclip_r101():
    return DetectionConfig(vision_layers=(3, 4, 23, 3), embed_dim=512, clip_weights="RN101.pt")


def retinanet_clip_r50():
    return _baseline(retinanet_denseclip_r50())


def retinanet_clip_r101():
    return _baseline(retinanet_denseclip_r101())


def retinanet_denseclip_tiny():
    # CPU-sized, for the built-in procedural images: denseclip_tiny's towers; the positional grid 224 // 32 = 7
    # covers max_size 213 padded to 224, as 1344 covers 1333 officially.
    return DetectionConfig(vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, input_resolution=224,
                           embed_dim=64, **TINY_TEXT, decoder_width=32, decoder_heads=2, decoder_layers=1,
                           neck_channels=32, min_size=128, max_size=213)


def retinanet_tiny():
    return _baseline(retinanet_denseclip_tiny())


def _maskrcnn(cfg):
    # mmdet's mask_rcnn_r50_fpn: FPN P2..P6 (P6 by stride-2 max pool), RPN anchors 8 x stride over strides
    # 4..64 (32..512 px), 3 ratios, assigned at IoU 0.7 / 0.3.
    cfg.detector, cfg.fpn_start_level, cfg.fpn_add_extra_convs = "maskrcnn", 0, ""
    cfg.anchor_strides, cfg.octave_base_scale, cfg.scales_per_octave = (4, 8, 16, 32, 64), 8.0, 1
    cfg.fg_iou_thresh, cfg.bg_iou_thresh = 0.7, 0.3
    return cfg


def maskrcnn_denseclip_r50():
    return _maskrcnn(retinanet_denseclip_r50())


def maskrcnn_denseclip_r101():
    return _maskrcnn(retinanet_denseclip_r101())


def maskrcnn_clip_r50():
    return _maskrcnn(retinanet_clip_r50())


def maskrcnn_clip_r101():
    return _maskrcnn(retinanet_clip_r101())


def maskrcnn_denseclip_tiny():
    # retinanet_denseclip_tiny's towers and sizes; heads narrowed to the tiny FPN's width, RPN anchors halved
    # (16..256 px: the procedural shapes are 10-60 px across), fewer sampled RoIs and proposals (a few objects
    # per small image).
    cfg = _maskrcnn(retinanet_denseclip_tiny())
    cfg.octave_base_scale, cfg.box_fc_channels, cfg.mask_conv_channels = 4.0, 128, 32
    cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train = 1000, 300
    cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test = 500, 300
    cfg.box_batch_size_per_image = 128
    return cfg


def maskrcnn_tiny():
    return _baseline(maskrcnn_denseclip_tiny())


# Fields with a fixed set of values, per config family.
CHOICES = {
    "backbone": ("resnet", "vit", "torchvision_resnet50"),
    "prompting": ("post", "pre", "none"),
    "test_mode": ("slide", "whole"),
}
DETECTION_CHOICES = {
    "backbone": ("resnet",),
    "prompting": ("post", "pre", "none"),
    "fpn_add_extra_convs": ("", "on_input", "on_lateral", "on_output"),
}


def _has_type(value, tp) -> bool:
    if get_origin(tp) is Union:
        return any(_has_type(value, t) for t in get_args(tp))
    if get_origin(tp) is tuple:  # Tuple[int, ...]
        return isinstance(value, (tuple, list)) and all(_has_type(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_config(cfg):
    """Refuse a config (DenseCLIPConfig or DetectionConfig) that would build something other than what it says: a
    wrong type, a value outside a field's fixed set, or a combination in which one field is silently ignored. The
    error names the field."""
    seg = isinstance(cfg, DenseCLIPConfig)
    def bad(name, why):
        return ConfigError(f"config field {name}={getattr(cfg, name)!r}: {why} (set it with --set {name}=VALUE or "
                           f"build_model(..., {name}=VALUE))")

    for f in fields(cfg):
        if not _has_type(getattr(cfg, f.name), f.type):
            raise bad(f.name, f"expected a value of type {getattr(f.type, '__name__', f.type)}")
    for name, allowed in (CHOICES if seg else DETECTION_CHOICES).items():
        if getattr(cfg, name) not in allowed:
            raise bad(name, f"must be one of {', '.join(map(repr, allowed))}")
    if cfg.backbone == "resnet" and len(cfg.vision_layers if isinstance(cfg.vision_layers, (tuple, list)) else ()) != 4:
        raise bad("vision_layers", "a ResNet needs four stage depths, e.g. (3, 4, 6, 3)")
    if cfg.backbone == "vit" and not isinstance(cfg.vision_layers, int):
        raise bad("vision_layers", "a ViT needs its depth as one number, e.g. 12")
    if seg and cfg.backbone == "vit" and cfg.patch_size != 16:
        raise bad("patch_size", "the DenseCLIP ViT pyramid (strides 4..32) is defined for patch size 16")
    stride = cfg.patch_size if seg and cfg.backbone == "vit" else 32
    if cfg.input_resolution <= 0 or cfg.input_resolution % stride:
        raise bad("input_resolution", f"must be a positive multiple of {stride} (the {cfg.backbone} grid)")
    if cfg.use_text and cfg.embed_dim is None:
        raise bad("embed_dim", "the text side needs the joint dimension; use_text=False for the plain-FPN baseline")
    if not cfg.use_text and cfg.prompting != "none":
        raise bad("prompting", "use_text=False has no text to prompt: set prompting=none")
    if cfg.prompting == "pre" and cfg.backbone == "torchvision_resnet50" and cfg.embed_dim is None:
        raise bad("embed_dim", "pre-model prompting needs the attention pool")
    if seg and not 0 <= cfg.score_concat_index <= 3:
        raise bad("score_concat_index", "must be a pyramid level 0..3")
    if cfg.class_token_length < 3:
        raise bad("class_token_length", "needs start + at least one name token + end = 3 or more")
    for name in ("num_contexts", "vision_width", "vision_heads", "text_width", "text_heads", "text_layers",
                 "decoder_width", "decoder_heads", "decoder_layers", "neck_channels", "head_channels", "test_crop",
                 "test_stride", "min_size", "max_size"):
        if hasattr(cfg, name) and getattr(cfg, name) < (0 if name == "num_contexts" else 1):
            raise bad(name, "must be positive")
    if seg and cfg.test_stride > cfg.test_crop:
        raise bad("test_stride", f"a stride larger than test_crop={cfg.test_crop} leaves pixels unpredicted")
    for name in ("drop_path_rate", "decoder_dropout", "head_dropout"):
        if hasattr(cfg, name) and not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "a dropout rate must be in [0, 1)")
    if cfg.tau <= 0:
        raise bad("tau", "the temperature must be positive")
    return cfg


def check_class_names(class_names: Sequence[str]) -> list:
    """The names as a list; none may be empty or repeated (after stripping spaces), and one is needed at least."""
    names = [str(n) for n in class_names]
    if not names:
        raise ConfigError("class_names is empty: at least one class is needed")
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise ConfigError(f"class name(s) at position {empty[:10]} are empty; every class needs a name "
                          "(the text encoder reads it)")
    seen, dup = set(), []
    for n in names:
        if n.strip() in seen and n.strip() not in dup:
            dup.append(n.strip())
        seen.add(n.strip())
    if dup:
        raise ConfigError(f"class names {dup[:10]} appear more than once; each class needs its own name")
    return names


CONFIGS = {f.__name__: f for f in (denseclip_r50, denseclip_r101, denseclip_vitb16, fpn_clip_r50, fpn_clip_r101,
                                   fpn_clip_vitb16, denseclip_imagenet_r50, denseclip_tiny, fpn_tiny,
                                   retinanet_denseclip_r50, retinanet_clip_r50, retinanet_denseclip_r101,
                                   retinanet_clip_r101, retinanet_denseclip_tiny, retinanet_tiny,
                                   maskrcnn_denseclip_r50, maskrcnn_clip_r50, maskrcnn_denseclip_r101,
                                   maskrcnn_clip_r101, maskrcnn_denseclip_tiny, maskrcnn_tiny)}


def task_of(name: str) -> str:
    """"segmentation" or "detection", from a config name, without building the model."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return "detection" if isinstance(CONFIGS[name](), DetectionConfig) else "segmentation"


def config_names(tasks=("segmentation", "detection")) -> str:
    """'segmentation: a, b; detection: c, d': the named configs by task, for the scripts' --model help."""
    return "; ".join(f"{task}: " + ", ".join(n for n in sorted(CONFIGS) if task_of(n) == task) for task in tasks)


def config_overrides(items, config_type=DenseCLIPConfig) -> dict:
    """['head_dropout=0', 'test_mode=slide'] -> {'head_dropout': 0, 'test_mode': 'slide'}; fields unknown to the
    model's config dataclass fail."""
    known, out = {f.name for f in fields(config_type)}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(value)  # numbers, tuples, True/False/None
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word is a string
    return out
