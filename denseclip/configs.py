"""Named model configs, mirroring the official DenseCLIP segmentation configs.

One dataclass, a comment per field; each named config is a plain function returning it. No
registry and no `_base_` inheritance: what a name builds is written out below. Overrides go
through `dataclasses.replace`, so an unknown field is an error rather than a silent no-op (the
official configs carry keys such as `style='pytorch'` or `outdim=` that nothing reads), and
`check_config` (called when a model is built) refuses values of the wrong type, outside a field's
fixed set, or that some other field would silently ignore.
"""
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union, get_args, get_origin

from .errors import ConfigError


@dataclass
class DenseCLIPConfig:
    # --- image encoder
    backbone: str = "resnet"  # "resnet" (CLIP ModifiedResNet), "vit" (CLIP ViT), "torchvision_resnet50" (ImageNet)
    vision_layers: Union[Tuple[int, ...], int] = (3, 4, 6, 3)  # blocks per ResNet stage, or ViT depth
    vision_width: int = 64  # ResNet stem width (stage widths are 4x, 8x, 16x, 32x) or ViT width
    vision_heads: int = 32  # attention-pool heads (official: hard-coded 32 = CLIP's width*32//64) or ViT heads
    patch_size: int = 16  # ViT only
    input_resolution: int = 512  # the grid the positional embeddings are stored at (= training crop)
    embed_dim: Optional[int] = 1024  # joint text-image dimension D; None: no attnpool/proj (FPN baselines)
    drop_path_rate: float = 0.0  # ViT stochastic depth (0.1 in the official DenseCLIP ViT-B config)
    vit_out_indices: Tuple[int, ...] = (3, 5, 7, 11)  # ViT blocks feeding the 4-level pyramid
    add_class_embedding_twice: bool = False  # official ViT quirk (issue #20); on to reproduce its checkpoints
    # --- text encoder (frozen) and learnable contexts
    use_text: bool = True  # False: the plain-FPN CLIP baseline (no text, no score map, no aux loss)
    class_token_length: int = 5  # SOT + up to 3 BPE tokens + EOT per class name (official: 5)
    num_contexts: int = 8  # learnable context vectors (CoOp); official: 13 text positions - 5 = 8
    truncate_class_names: bool = False  # cut names longer than the budget instead of raising
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    vocab_size: int = 49408
    freeze_text_encoder: bool = True  # requires_grad_(False); the contexts still learn through it
    # --- context-aware prompting
    prompting: str = "post"  # "post" (t + γ·decoder(t, [z̄; z])), "pre" (visual prompt into the text encoder), "none"
    decoder_width: int = 256
    decoder_heads: int = 4
    decoder_layers: int = 3
    decoder_dropout: float = 0.1
    gamma_init: float = 1e-4  # small: start from CLIP's own text features, let the visual context in slowly
    # --- score map, neck, head, losses
    score_concat_index: int = 3  # pyramid level that gets the K score channels (2 for ViT: stride 16)
    tau: float = 0.07  # CLIP's temperature: the aux loss is CE on s / tau
    aux_loss_weight: float = 0.4  # weight of the identity (score map) loss, official value
    neck_channels: int = 256
    head_channels: int = 256
    head_dropout: float = 0.1
    ignore_index: int = 255
    # --- inference
    test_mode: str = "slide"  # "slide" or "whole"
    test_crop: int = 512
    test_stride: int = 341
    clip_weights: Optional[str] = None  # OpenAI CLIP file the official recipe starts from (pretrained/<name>)


def denseclip_r50():
    return DenseCLIPConfig(clip_weights="RN50.pt")


def denseclip_r101():
    return DenseCLIPConfig(vision_layers=(3, 4, 23, 3), embed_dim=512, clip_weights="RN101.pt")


def denseclip_vitb16():
    return DenseCLIPConfig(backbone="vit", vision_layers=12, vision_width=768, vision_heads=12, input_resolution=640,
                           embed_dim=512, drop_path_rate=0.1, add_class_embedding_twice=True, score_concat_index=2,
                           test_crop=640, test_stride=426, clip_weights="ViT-B-16.pt")


def _baseline(cfg):
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


def denseclip_tiny():
    # CPU-sized: trains on the built-in procedural data in minutes on 2 cores.
    return DenseCLIPConfig(vision_layers=(1, 1, 1, 1), vision_width=16, vision_heads=8, input_resolution=128,
                           embed_dim=64, text_width=128, text_heads=2, text_layers=2, decoder_width=32,
                           decoder_heads=2, decoder_layers=1, neck_channels=32, head_channels=32,
                           test_mode="whole", test_crop=128, test_stride=85)


def fpn_tiny():
    return _baseline(denseclip_tiny())


# Fields with a fixed set of values, and what each value selects.
CHOICES = {
    "backbone": ("resnet", "vit", "torchvision_resnet50"),
    "prompting": ("post", "pre", "none"),
    "test_mode": ("slide", "whole"),
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


def check_config(cfg: DenseCLIPConfig) -> DenseCLIPConfig:
    """Refuse a config that would build something other than what it says: a wrong type, a value outside a field's
    fixed set, or a combination in which one field is silently ignored. The error names the field."""
    def bad(name, why):
        return ConfigError(f"config field {name}={getattr(cfg, name)!r}: {why} (set it with --set {name}=VALUE or "
                           f"build_model(..., {name}=VALUE))")

    for f in fields(cfg):
        if not _has_type(getattr(cfg, f.name), f.type):
            raise bad(f.name, f"expected a value of type {getattr(f.type, '__name__', f.type)}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise bad(name, f"must be one of {', '.join(allowed)}")
    if cfg.backbone == "resnet" and len(cfg.vision_layers if isinstance(cfg.vision_layers, (tuple, list)) else ()) != 4:
        raise bad("vision_layers", "a ResNet needs four stage depths, e.g. (3, 4, 6, 3)")
    if cfg.backbone == "vit" and not isinstance(cfg.vision_layers, int):
        raise bad("vision_layers", "a ViT needs its depth as one number, e.g. 12")
    if cfg.backbone == "vit" and cfg.patch_size != 16:
        raise bad("patch_size", "the DenseCLIP ViT pyramid (strides 4..32) is defined for patch size 16")
    stride = cfg.patch_size if cfg.backbone == "vit" else 32
    if cfg.input_resolution <= 0 or cfg.input_resolution % stride:
        raise bad("input_resolution", f"must be a positive multiple of {stride} (the {cfg.backbone} grid)")
    if cfg.use_text and cfg.embed_dim is None:
        raise bad("embed_dim", "the text side needs the joint dimension; use_text=False for the plain-FPN baseline")
    if not cfg.use_text and cfg.prompting != "none":
        raise bad("prompting", "use_text=False has no text to prompt: set prompting=none")
    if cfg.prompting == "pre" and cfg.backbone == "torchvision_resnet50" and cfg.embed_dim is None:
        raise bad("embed_dim", "pre-model prompting needs the attention pool")
    if not 0 <= cfg.score_concat_index <= 3:
        raise bad("score_concat_index", "must be a pyramid level 0..3")
    if cfg.class_token_length < 3:
        raise bad("class_token_length", "needs start + at least one name token + end = 3 or more")
    for name in ("num_contexts", "vision_width", "vision_heads", "text_width", "text_heads", "text_layers",
                 "decoder_width", "decoder_heads", "decoder_layers", "neck_channels", "head_channels", "test_crop",
                 "test_stride"):
        if getattr(cfg, name) < (0 if name == "num_contexts" else 1):
            raise bad(name, "must be positive")
    if cfg.test_stride > cfg.test_crop:
        raise bad("test_stride", f"a stride larger than test_crop={cfg.test_crop} leaves pixels unpredicted")
    for name in ("drop_path_rate", "decoder_dropout", "head_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
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
                                   fpn_clip_vitb16, denseclip_imagenet_r50, denseclip_tiny, fpn_tiny)}
