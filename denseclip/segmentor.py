"""The DenseCLIP segmentor (paper Sec. 3, Fig. 3): pixel-text score maps guiding a Semantic FPN. `DenseCLIP.forward`
is the paper's pipeline, in its order:

    image -> image encoder -> x1..x4, z̄, z                      resnet.py (CLIP ResNet) or clip.py (ViT)
    t = TextEncoder([SOT, contexts, class name, EOT])            language.py: class_text_features (Sec. 3.3)
    t <- t + γ · ContextDecoder(t, [z̄; z])                      language.py: context_aware_text (Sec. 3.3)
    s = ẑ t̂ᵀ (B, K, h, w)                                       language.py: score_map (Sec. 3.2)
    x4 <- [x4, s] (ViT: x3) -> FPN -> Semantic-FPN head -> logits   fpn.py, heads.py
    loss = CE(logits, y) + 0.4 · CE(s / τ, y)                    here (Sec. 3.4)

Mirrors the official `DenseCLIP` segmentor (segmentation/denseclip/denseclip.py) with mmseg's `FPN` neck and
`FPNHead`, keeping their parameter names (`neck.lateral_convs.0.conv.weight`, `decode_head.scale_heads.1.0.bn.weight`,
`text_encoder.*`, `contexts`, `gamma`, ...) so official checkpoints load without renaming. Differences from the
official code:
- no mmcv/mmseg: the neck (fpn.py, shared with detection), head (heads.py), losses (here) and slide inference
  (inference.py) are written out;
- the text side is language.py's (frozen text encoder run once at evaluation, its differences listed there);
- pre-model prompting (the paper's ablation) and an ImageNet ResNet-50 backbone are selectable;
- `score_logits` / `predict(names=...)` score any class names (open vocabulary) from s / τ.
Shape letters: B batch, K classes, D joint dim, C_i channels of level i, h w = the grid of z (stride 32; ViT 16).
"""
import functools
from dataclasses import replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inference, language
from .clip import VisionTransformer
from .configs import CONFIGS, DenseCLIPConfig, check_config
from .errors import ConfigError
from .fpn import FPN
from .heads import FPNHead
from .inference import resize
from .precision import at_least_fp32
from .resnet import AttentionPool2d, ModifiedResNet


class TorchvisionResNet(nn.Module):
    """Any backbone (official issues #7, #47): torchvision's ImageNet ResNet-50 (weights from a local
    file through load_checkpoint) with a freshly initialised CLIP attention pool on its last stage that
    projects to the text dimension. Keys are torchvision's (conv1, bn1, layer1..4) plus attnpool."""

    def __init__(self, output_dim: Optional[int], heads: int, input_resolution: int):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.out_channels = [256, 512, 1024, 2048]
        self.attnpool = None if output_dim is None else AttentionPool2d(input_resolution // 32, 2048, heads, output_dim)

    def forward_dense(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        if self.attnpool is None:
            return feats, None, None
        return (feats, *self.attnpool(x))


def build_backbone(cfg: DenseCLIPConfig) -> nn.Module:
    if cfg.backbone == "resnet":
        return ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.input_resolution,
                              cfg.vision_width)
    if cfg.backbone == "vit":
        return VisionTransformer(cfg.input_resolution, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                 cfg.vision_heads, cfg.embed_dim, cfg.drop_path_rate, cfg.vit_out_indices,
                                 pyramid=True, add_class_embedding_twice=cfg.add_class_embedding_twice)
    if cfg.backbone == "torchvision_resnet50":
        return TorchvisionResNet(cfg.embed_dim, cfg.vision_heads, cfg.input_resolution)
    raise ValueError(f"unknown backbone {cfg.backbone!r}: expected 'resnet', 'vit' or 'torchvision_resnet50'")


def pad_to_patches(images: torch.Tensor, patch: int, training: bool) -> torch.Tensor:
    """Pad (B, 3, H, W) at the bottom and right with 0 (the normalised mean) to multiples of the ViT patch size,
    instead of dropping the pixels the patch embedding would not cover; a training crop must fit exactly."""
    H, W = images.shape[-2:]
    if training and (H % patch or W % patch):
        raise ConfigError(f"training input {H}x{W} is not a multiple of the ViT patch size {patch}; "
                          f"choose --crop-size as a multiple of {patch}")
    # Padded by 0 rows also when the size fits already: the same operations for every size, so that a traced graph
    # (tools/export.py's ONNX file) pads the sizes it was not traced at.
    return F.pad(images, (0, -W % patch, 0, -H % patch)) if patch > 1 else images


def seg_cross_entropy(logits, labels, ignore_index: int):
    """Pixel CE, averaged over ALL pixels with ignored ones counting zero: mmseg 0.19's behaviour
    (the official numbers were trained with it), not PyTorch's mean over non-ignored pixels."""
    return F.cross_entropy(at_least_fp32(logits), labels, ignore_index=ignore_index, reduction="none").mean()


class DenseCLIP(nn.Module):
    """model(images) -> logits (B, K, H, W) at input size; model(images, labels) -> dict of losses."""

    task = "segmentation"

    def __init__(self, cfg: DenseCLIPConfig, class_names: Sequence[str]):
        super().__init__()
        self.cfg = check_config(cfg)
        self.backbone = build_backbone(cfg)
        language.add_language(self, cfg, class_names)  # text_encoder, texts, contexts, context_decoder, gamma
        K = self.num_classes
        channels = list(self.backbone.out_channels)
        if cfg.use_text:
            channels[cfg.score_concat_index] += K  # the score map joins this level
        self.neck = FPN(channels, cfg.neck_channels)
        self.decode_head = FPNHead([cfg.neck_channels] * 4, cfg.head_channels, K, cfg.head_dropout)

    def forward(self, images, labels: Optional[torch.Tensor] = None):
        """The pipeline of the module docstring on a normalised batch (B, 3, H, W); a ViT test input is padded to
        its patch size and the logits cropped back."""
        cfg, (H, W) = self.cfg, images.shape[-2:]
        images = pad_to_patches(images, cfg.patch_size if cfg.backbone == "vit" else 1, training=labels is not None)
        feats, z_global, z_dense = self.backbone.forward_dense(images)  # x1..x4, z̄ (B, D), z (B, D, h, w)
        score = None
        if cfg.use_text:
            text = language.context_aware_text(self, z_global, z_dense)  # t (B, K, D): contexts, γ · decoder
            score = language.score_map(z_dense, text)  # s (B, K, h, w)
            i = cfg.score_concat_index
            feats[i] = torch.cat([feats[i], score.to(feats[i].dtype)], dim=1)  # (B, C_i + K, h, w)
        logits = self.decode_head(self.neck(feats))  # (B, K, H/4, W/4)
        if labels is None:
            return resize(logits, images.shape[-2:])[..., :H, :W]  # (B, K, H, W)
        # Promoted before the resize, as mmseg's force_fp32 losses do: under bf16 the (B, K, H, W) upsample and its
        # backward run in fp32 (more exact), and the cast touches the 16x smaller stride-4 logits, not the full size.
        size = labels.shape[-2:]
        losses = {"loss_decode": seg_cross_entropy(resize(at_least_fp32(logits), size), labels, cfg.ignore_index)}
        if score is not None:  # the "identity head": the score map itself as a segmentation (s / τ)
            losses["loss_aux"] = cfg.aux_loss_weight * seg_cross_entropy(resize(score / cfg.tau, size), labels,
                                                                         cfg.ignore_index)
        return losses

    # --- inference
    @torch.no_grad()
    def score_logits(self, images, names: Optional[Sequence[str]] = None):
        """The score map as a segmentation, s / τ at input size (B, K, H, W), as the aux loss trains it. With
        `names` (open vocabulary): the scores of those names instead (B, K', H, W). Only the language path
        answers for new names; the decode head knows the training classes only."""
        _, z_global, z_dense = self.backbone.forward_dense(images)
        score = language.score_map(z_dense, language.context_aware_text(self, z_global, z_dense, names))
        return resize(score / self.cfg.tau, images.shape[-2:])  # (B, K', H, W)

    @torch.no_grad()
    def predict(self, images, out_size=None, ratios: Sequence[float] = (1.0,), flip: bool = False, mode=None,
                names: Optional[Sequence[str]] = None):
        """Class probabilities (B, K, *out_size): softmax averaged over scale ratios and horizontal flips
        (mmseg's aug test). Scales resize the given (already test-resized) batch by each ratio. Runs in eval
        mode (dropout off, BatchNorm running statistics) whatever mode the model is in, and restores that mode.
        names: open vocabulary, probabilities over these names from softmax(s / τ) (score_logits), not the
        decode head."""
        forward = self if names is None else functools.partial(self.score_logits, names=names)
        was_training = self.training
        self.eval()
        try:
            return inference.predict(forward, images, mode or self.cfg.test_mode, self.cfg.test_crop,
                                     self.cfg.test_stride, out_size, ratios, flip)
        finally:
            self.train(was_training)


def build_segmentor(name: str, class_names: Sequence[str], **overrides) -> DenseCLIP:
    """A named segmentation config (see configs.CONFIGS), with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return DenseCLIP(replace(CONFIGS[name](), **overrides), class_names)
