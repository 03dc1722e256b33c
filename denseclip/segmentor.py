"""The DenseCLIP segmentor (paper Sec. 3, Fig. 2): pixel-text score maps feeding a Semantic FPN.

    image -> backbone -> x1..x4, z̄, z          (clip.py)
    class names + learnable contexts -> text encoder -> t          (K, D)
    t <- t + γ · ContextDecoder(t, [z̄; z])                          (prompting.py, post-model)
    s = <ẑ, t̂>  (B, K, h, w);  x4 <- [x4, s]  -> FPN -> Semantic-FPN head -> logits
    loss = CE(logits, y) + 0.4 · CE(s / τ, y)

Mirrors the official `DenseCLIP` segmentor plus mmseg's `FPN` neck and `FPNHead`, with the same
parameter names (`neck.lateral_convs.0.conv.weight`, `decode_head.scale_heads.1.0.bn.weight`, ...)
so official checkpoints load without renaming. Differences from the official code:
- no mmcv/mmseg: the neck, head, losses and slide inference are written out here;
- the text encoder is frozen with requires_grad_(False) (official: lr 0, issue #28), and at
  evaluation its output is computed once and cached (official: every forward, issue #40);
- a class name longer than the token budget is a clear error naming it (official: a crash);
- pre-model prompting (the paper's ablation) and an ImageNet ResNet-50 backbone are selectable.
Shape letters: B batch, K classes, D joint dim, h w = feature grid at stride 32 (16 for ViT's z).
"""
import math
from dataclasses import replace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import AttentionPool2d, ModifiedResNet, TextEncoder, VisionTransformer
from .configs import CONFIGS, DenseCLIPConfig
from .prompting import ContextDecoder, PreModelPrompter
from .tokenizer import tokenize


def resize(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """conv (+ BatchNorm) (+ ReLU), with mmcv's ConvModule names (conv, bn); bias only without norm."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: bool = False, act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.act else x


class FPN(nn.Module):
    """mmseg's FPN neck (num_outs = number of inputs): 1x1 laterals, nearest top-down, 3x3 outputs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in in_channels)
        for m in self.modules():  # mmseg's FPN init: Xavier-uniform convs
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, lat)]


class FPNHead(nn.Module):
    """Semantic FPN head (Kirillov et al. 2019), mmseg's FPNHead: level i gets max(1, log2(stride_i/4))
    conv-BN-ReLU blocks, each followed by a x2 bilinear upsample, until stride 4; the levels are summed."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, dropout: float = 0.1,
                 strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for cin, s in zip(in_channels, strides):
            blocks = []
            for k in range(max(1, int(math.log2(s) - math.log2(strides[0])))):
                blocks.append(ConvModule(cin if k == 0 else channels, channels, 3, norm=True, act=True))
                if s != strides[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        x = self.scale_heads[0](feats[0])  # (B, channels, H/4, W/4)
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            x = x + resize(head(f), x.shape[-2:])
        return self.conv_seg(self.dropout(x))  # (B, K, H/4, W/4)


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


def tokenize_class_names(names: Sequence[str], length: int, truncate: bool) -> torch.Tensor:
    """(K, length) token ids; a name that does not fit the budget is an error naming it."""
    rows = []
    for name in names:
        try:
            rows.append(tokenize(name, context_length=length, truncate=truncate))
        except RuntimeError:
            raise ValueError(f"class name {name!r} needs more than {length} tokens (SOT + BPE + EOT); raise "
                             f"class_token_length or set truncate_class_names=True") from None
    return torch.cat(rows)


def seg_cross_entropy(logits, labels, ignore_index: int):
    """Pixel CE, averaged over ALL pixels with ignored ones counting zero: mmseg 0.19's behaviour
    (the official numbers were trained with it), not PyTorch's mean over non-ignored pixels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none").mean()


class DenseCLIP(nn.Module):
    """model(images) -> logits (B, K, H, W) at input size; model(images, labels) -> dict of losses."""

    def __init__(self, cfg: DenseCLIPConfig, class_names: Sequence[str]):
        super().__init__()
        if cfg.prompting not in ("post", "pre", "none"):
            raise ValueError(f"prompting must be 'post', 'pre' or 'none', not {cfg.prompting!r}")
        self.cfg, self.class_names = cfg, [n.strip() for n in class_names]
        K = self.num_classes = len(self.class_names)
        self.backbone = build_backbone(cfg)
        channels = list(self.backbone.out_channels)
        if cfg.use_text:
            self.text_encoder = TextEncoder(cfg.class_token_length + cfg.num_contexts, cfg.vocab_size, cfg.text_width,
                                            cfg.text_heads, cfg.text_layers, cfg.embed_dim)
            if cfg.freeze_text_encoder:
                self.text_encoder.requires_grad_(False)
            texts = tokenize_class_names(self.class_names, cfg.class_token_length, cfg.truncate_class_names)
            self.register_buffer("texts", texts, persistent=False)  # (K, class_token_length)
            if cfg.prompting == "pre":
                self.prompter = PreModelPrompter(cfg.num_contexts, cfg.text_width, cfg.embed_dim, cfg.decoder_width,
                                                 cfg.decoder_heads, cfg.decoder_layers, cfg.decoder_dropout)
            else:  # learnable contexts (1, M, text_width), truncated normal with std 1 as the official code
                self.contexts = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.num_contexts, cfg.text_width)))
            if cfg.prompting == "post":
                self.context_decoder = ContextDecoder(cfg.embed_dim, cfg.decoder_width, cfg.decoder_heads,
                                                      cfg.decoder_layers, cfg.decoder_dropout)
                self.gamma = nn.Parameter(torch.full((cfg.embed_dim,), cfg.gamma_init))
            channels[cfg.score_concat_index] += K  # the score map joins this level
        self.neck = FPN(channels, cfg.neck_channels)
        self.decode_head = FPNHead([cfg.neck_channels] * 4, cfg.head_channels, K, cfg.head_dropout)
        self._text_cache = None

    # --- text features: fixed once trained, so computed once per model at evaluation
    def text_features(self) -> torch.Tensor:
        """(1, K, D) for post-model / no prompting. Cached while in eval mode without autograd."""
        if hasattr(self, "text_embeddings"):  # after drop_text_encoder()
            return self.text_embeddings
        if self._text_cache is not None:
            return self._text_cache
        text = self.text_encoder(self.texts, self.contexts)  # (1, K, D)
        if not self.training and not torch.is_grad_enabled():
            self._text_cache = text
        return text

    @torch.no_grad()
    def drop_text_encoder(self):
        """For deployment (official issue #40): the text features no longer change once trained, so keep
        them as a buffer `text_embeddings` (1, K, D) and delete the text encoder and the contexts (RN50:
        -63M parameters). load_checkpoint calls this itself for checkpoints saved after it."""
        if self.cfg.prompting == "pre":
            raise ValueError("pre-model prompting runs the text encoder on every image; it cannot be dropped")
        if hasattr(self, "text_encoder"):
            was_training = self.training
            self.train(False)
            self.register_buffer("text_embeddings", self.text_encoder(self.texts, self.contexts).detach())
            del self.text_encoder, self.contexts, self.texts
            self.train(was_training)
        return self

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .float(): the cache would be stale
        self._text_cache = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._text_cache = None
        return super().load_state_dict(*args, **kwargs)

    # --- forward
    def score_map(self, z_global, z_dense):
        """Pixel-text score map s (B, K, h, w) from z̄ (B, D) and z (B, D, h, w), Eq. 3-5."""
        B, D, h, w = z_dense.shape
        visual = torch.cat([z_global[:, None], z_dense.flatten(2).transpose(1, 2)], dim=1)  # (B, 1+hw, D)
        if self.cfg.prompting == "pre":
            text = self.text_encoder(self.texts, self.prompter(visual))  # (B, K, D): per-image prompts
        else:
            text = self.text_features().to(z_dense.dtype).expand(B, -1, -1)  # (B, K, D)
        if self.cfg.prompting == "post":
            text = text + self.gamma * self.context_decoder(text, visual)  # (B, K, D)
        return torch.einsum("bdhw,bkd->bkhw", F.normalize(z_dense, dim=1), F.normalize(text, dim=2))  # (B, K, h, w)

    def forward_logits(self, images):
        """-> (logits (B, K, H/4, W/4), score map (B, K, h, w) or None)"""
        feats, z_global, z_dense = self.backbone.forward_dense(images)
        score = None
        if self.cfg.use_text:
            score = self.score_map(z_global, z_dense)
            i = self.cfg.score_concat_index
            feats = feats[:i] + [torch.cat([feats[i], score.to(feats[i].dtype)], dim=1)] + feats[i + 1:]
        return self.decode_head(self.neck(feats)), score

    def forward(self, images, labels: Optional[torch.Tensor] = None):
        logits, score = self.forward_logits(images)
        if labels is None:
            return resize(logits, images.shape[-2:])
        size, cfg = labels.shape[-2:], self.cfg
        losses = {"loss_decode": seg_cross_entropy(resize(logits, size), labels, cfg.ignore_index)}
        if score is not None:  # the "identity head": the score map itself as a segmentation (s / τ)
            losses["loss_aux"] = cfg.aux_loss_weight * seg_cross_entropy(resize(score / cfg.tau, size), labels,
                                                                         cfg.ignore_index)
        return losses

    # --- inference
    @torch.no_grad()
    def slide_inference(self, images, crop: int, stride: int):
        """Logits (B, K, H, W) averaged over overlapping crop x crop windows (mmseg's slide mode). All
        windows have the same size (min(crop, H) x min(crop, W)), so they run as one batch."""
        B, _, H, W = images.shape
        rows = max(H - crop + stride - 1, 0) // stride + 1
        cols = max(W - crop + stride - 1, 0) // stride + 1
        boxes = []
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
                boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n*B, 3, h, w)
        logits = self(crops).float().split(B)  # n x (B, K, h, w)
        out = images.new_zeros((B, self.num_classes, H, W), dtype=torch.float32)
        count = images.new_zeros((1, 1, H, W), dtype=torch.float32)
        for (y1, y2, x1, x2), lg in zip(boxes, logits):
            out[:, :, y1:y2, x1:x2] += lg
            count[:, :, y1:y2, x1:x2] += 1
        return out / count

    @torch.no_grad()
    def predict(self, images, out_size=None, ratios: Sequence[float] = (1.0,), flip: bool = False, mode=None):
        """Class probabilities (B, K, *out_size): softmax averaged over scale ratios and horizontal flips
        (mmseg's aug test). Scales resize the given (already test-resized) batch by each ratio."""
        mode = mode or self.cfg.test_mode
        out_size = tuple(out_size or images.shape[-2:])
        probs = 0.0
        for r in ratios:
            x = images if r == 1 else F.interpolate(images, scale_factor=r, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                xi = x.flip(-1) if flipped else x
                logits = self.slide_inference(xi, self.cfg.test_crop, self.cfg.test_stride) if mode == "slide" \
                    else self(xi).float()
                p = resize(logits, out_size).softmax(dim=1)
                probs = probs + (p.flip(-1) if flipped else p)
        return probs / (len(ratios) * (2 if flip else 1))


def build_model(name: str, class_names: Optional[Sequence[str]] = None, **overrides) -> DenseCLIP:
    """A named config (see configs.CONFIGS), with field overrides; class names default to ADE20K's 150."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    cfg = replace(CONFIGS[name](), **overrides)
    if class_names is None:
        from .data import ADE20K_CLASSES

        class_names = ADE20K_CLASSES
    return DenseCLIP(cfg, class_names)
