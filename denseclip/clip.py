"""CLIP's two towers, with the dense outputs DenseCLIP needs (paper Sec. 3.1-3.2).

Mirrors OpenAI CLIP's `model.py` and keeps every parameter name, so OpenAI `.pt` archives and
official DenseCLIP checkpoints load strictly. What differs from OpenAI's code:
- Tensors are batch-first everywhere and attention runs through `F.scaled_dot_product_attention`
  (OpenAI permutes to (L, B, C) for `nn.MultiheadAttention`); no `.half()`: use `torch.autocast`.
- `AttentionPool2d` uses every spatial position as a query, not only the mean token, and returns
  both the pooled feature z̄ (identical to CLIP's) and the dense map z (DenseCLIP's Eq. 1-2).
  Its positional embedding is resized bilinearly when the feature grid differs from training, or, with
  `crop_pos_embed` (the official detection code), cropped to the feature grid.
- `ModifiedResNet.forward_dense` / `VisionTransformer.forward_dense` also return the four pyramid
  levels. The ViT pyramid (up x4, up x2, identity, down x2 from blocks 3, 5, 7, 11) is the one
  of the official DenseCLIP ViT-B/16 backbone, with the same parameter names (fpn1..fpn4).
- `readout="maskclip"` in `forward_dense` swaps the dense map z for MaskCLIP's (Zhou et al., ECCV 2022,
  "Extract Free Dense Labels from CLIP"), which keeps no query-key attention in the last step: ResNet: each
  position through the attention pool's v_proj and c_proj only (no positional embedding, as MaskCLIP's head);
  ViT: the last block with its attention replaced by the value path, x + out_proj(v_proj(ln_1(x))), then that
  block's MLP, ln_post and proj. z̄ stays CLIP's pooled feature. Zero-shot segmentation uses it (zeroshot.py).
- `TextEncoder` accepts learnable context vectors inserted right after the start token (CoOp),
  and truncates its positional embedding to the sequence it is given.

Shape letters: B batch, C channels, H W feature grid, N = H*W visual tokens, K classes (texts),
L text length, M learnable context tokens, D joint embedding dimension.
"""
import math
import warnings
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU; the released weights were trained with it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def drop_path(x, p: float, training: bool):
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def resize_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(1 + S*S, C) positional embedding -> (1 + H*W, C): the class/mean slot is kept, the square
    spatial grid is resized bilinearly (align_corners=False, as the official DenseCLIP code)."""
    n, C = pos.shape
    S = math.isqrt(n - 1)
    assert S * S == n - 1, f"positional embedding of {n} rows is not 1 + a square grid"
    if (S, S) == tuple(grid):
        return pos
    spatial = pos[1:].reshape(1, S, S, C).permute(0, 3, 1, 2)  # (1, C, S, S)
    spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
    spatial = spatial.flatten(2).transpose(1, 2)[0]  # (H*W, C)
    return torch.cat([pos[:1], spatial], dim=0)


def crop_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(1 + S*S, C) positional embedding -> (1 + H*W, C): the class/mean slot is kept and the top-left H x W
    block of the square S x S grid is used as is, what the official DenseCLIP detection backbone does (its
    checkpoints were trained that way; the grid is stored at 1344 // 32 = 42, the largest padded input)."""
    n, C = pos.shape
    S = math.isqrt(n - 1)
    H, W = grid
    if H > S or W > S:
        raise ValueError(f"feature grid {H}x{W} exceeds the stored {S}x{S} positional grid: raise input_resolution "
                         f"to at least {32 * max(H, W)} or resize the input smaller")
    spatial = pos[1:].reshape(S, S, C)[:H, :W].reshape(H * W, C)  # (H*W, C)
    return torch.cat([pos[:1], spatial], dim=0)


# ----------------------------------------------------------------------------- ModifiedResNet
class Bottleneck(nn.Module):
    """torchvision's Bottleneck with CLIP's anti-aliasing: every conv has stride 1 and an avgpool
    follows the 3x3 conv (and precedes the 1x1 downsample conv) when stride > 1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # the key "-1" is OpenAI's: the avgpool sits before the conv "0" and norm "1"
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


READOUTS = ("denseclip", "maskclip")  # the dense read-outs of forward_dense (see the module docstring)


def check_readout(readout: str):
    if readout not in READOUTS:
        raise ValueError(f"unknown dense read-out {readout!r}; expected one of {READOUTS}")


class AttentionPool2d(nn.Module):
    """CLIP's QKV attention pooling, run with every position as a query (DenseCLIP Eq. 1-2).

    Input (B, C, H, W). The mean token is prepended, positional embeddings added, and one
    multi-head attention over the 1 + N tokens gives z̄ (the mean token's output, equal to CLIP's
    pooled feature) and z (every other token's output, projected the same way by c_proj).
    `crop_pos_embed`: crop the stored positional grid to the feature grid (official detection) instead of
    resizing it (official segmentation, CLIP).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None,
                 crop_pos_embed: bool = False):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.crop_pos_embed = crop_pos_embed

    def forward(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        h = self.num_heads
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+N, C)
        pos = (crop_pos_embed if self.crop_pos_embed else resize_pos_embed)(self.positional_embedding, (H, W))
        x = x + pos.to(x.dtype)  # (B, 1+N, C)
        q, k, v = (p(x).view(B, 1 + H * W, h, C // h).transpose(1, 2)  # (B, h, 1+N, C/h)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1+N, C/h)
        x = self.c_proj(x.transpose(1, 2).reshape(B, 1 + H * W, C))  # (B, 1+N, D)
        z_global = x[:, 0]  # (B, D)
        z_dense = x[:, 1:].transpose(1, 2).reshape(B, -1, H, W)  # (B, D, H, W)
        return z_global, z_dense

    def forward_values(self, x) -> torch.Tensor:
        """MaskCLIP's dense read-out (B, D, H, W): every position through v_proj then c_proj, no attention."""
        B, C, H, W = x.shape
        x = self.c_proj(self.v_proj(x.flatten(2).transpose(1, 2)))  # (B, N, D)
        return x.transpose(1, 2).reshape(B, -1, H, W)  # (B, D, H, W)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet. Differences from torchvision's ResNet:
    - a 3-conv stem (stride 2, then 1, 1) followed by a 2x2 avgpool instead of one 7x7 conv + maxpool;
    - anti-aliased strided blocks (see Bottleneck);
    - attention pooling instead of global average pooling (absent when output_dim is None, as in
      the plain-FPN CLIP baselines, whose checkpoints have no attnpool weights); `crop_pos_embed` as in
      AttentionPool2d.
    `forward` gives CLIP's image embedding; `forward_dense` gives the pyramid, z̄ and z.
    """

    def __init__(self, layers: Sequence[int], output_dim: Optional[int], heads: int,
                 input_resolution: int = 224, width: int = 64, crop_pos_embed: bool = False):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.out_channels = [width * 4 * 2 ** i for i in range(4)]  # 256, 512, 1024, 2048 for width 64
        self.attnpool = None
        if output_dim is not None:
            self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim, crop_pos_embed)
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialisation: attention-pool projections with std in_features^-0.5, and the last BN
        of every residual branch at zero so each block starts as the identity."""
        if self.attnpool is not None:
            for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
                nn.init.normal_(proj.weight, std=self.attnpool.c_proj.in_features ** -0.5)
        for name, p in self.named_parameters():
            if name.endswith("bn3.weight") and name.startswith("layer"):
                nn.init.zeros_(p)

    def forward_pyramid(self, x) -> List[torch.Tensor]:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)  # (B, width, H/4, W/4)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)  # strides 4, 8, 16, 32
        return feats

    def forward_dense(self, x, readout: str = "denseclip"):
        """-> ([x1, x2, x3, x4], z̄ (B, D) or None, z (B, D, H/32, W/32) or None); readout "denseclip" (every
        position a query of the attention pool) or "maskclip" (value and output projections only)."""
        check_readout(readout)
        feats = self.forward_pyramid(x)
        if self.attnpool is None:
            return feats, None, None
        z_global, z_dense = self.attnpool(feats[-1])
        if readout == "maskclip":
            z_dense = self.attnpool.forward_values(feats[-1])
        return feats, z_global, z_dense

    def forward(self, x):
        return self.attnpool(self.forward_pyramid(x)[-1])[0]  # (B, D)


# ----------------------------------------------------------------------------- transformers
class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight, in_proj_bias, out_proj), batch-first,
    computed with scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal: bool = False):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, C/h)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, L, C/h)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block with CLIP's names (ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, width: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.drop_path = drop_path

    def forward(self, x, causal: bool = False):
        x = x + drop_path(self.attn(self.ln_1(x), causal), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path, self.training)

    def forward_values(self, x):
        """MaskCLIP's last block: attention replaced by its value path, x + out_proj(v_proj(ln_1(x))), then the MLP."""
        C = x.shape[-1]
        v = F.linear(self.ln_1(x), self.attn.in_proj_weight[2 * C:], self.attn.in_proj_bias[2 * C:])  # (B, L, C)
        x = x + self.attn.out_proj(v)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.width, self.layers = width, layers
        rates = torch.linspace(0, drop_path_rate, layers).tolist()  # stochastic depth grows with depth
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, r) for r in rates])

    def forward(self, x, causal: bool = False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


# ----------------------------------------------------------------------------- VisionTransformer
class VisionTransformer(nn.Module):
    """CLIP's ViT, plus the official DenseCLIP dense outputs.

    forward_dense: the pyramid from the patch tokens of blocks `out_indices` (fpn1..fpn4: up x4,
    up x2, identity, down x2; only when `pyramid`), and ln_post + proj applied to every token:
    z̄ from the class token, z from the patch tokens (only when output_dim is set).
    `add_class_embedding_twice` reproduces the official DenseCLIP ViT (official issue #20): it adds
    the class embedding to the class token's positional embedding as well, so the class token
    carries it twice. Its released ViT-B checkpoint was trained that way; keep it off otherwise.
    """

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: Optional[int], drop_path_rate: float = 0.0, out_indices: Sequence[int] = (3, 5, 7, 11),
                 pyramid: bool = False, add_class_embedding_twice: bool = False):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.out_indices = list(out_indices)
        self.add_class_embedding_twice = add_class_embedding_twice
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, drop_path_rate)
        if output_dim is not None:
            self.ln_post = nn.LayerNorm(width)
            self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.out_channels = [width] * 4
        if pyramid:
            assert patch_size == 16, "the official pyramid is defined for patch size 16 (strides 4..32)"
            # BatchNorm2d here is the official SyncBatchNorm; train.py converts it when world size > 1
            self.fpn1 = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, 2, stride=2),
                                      nn.BatchNorm2d(width), nn.GELU(), nn.ConvTranspose2d(width, width, 2, stride=2))
            self.fpn2 = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, 2, stride=2))
            self.fpn3 = nn.GroupNorm(1, width)
            self.fpn4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2, stride=2))

    def _tokens(self, x):
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:  # the conv would drop the remainder
            raise ValueError(f"ViT input {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size};"
                             " pad it first")
        x = self.conv1(x)  # (B, C, H, W)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        pos = resize_pos_embed(self.positional_embedding, (H, W)).to(x.dtype)  # (1+N, C)
        if self.add_class_embedding_twice:
            pos = torch.cat([pos[:1] + self.class_embedding.to(x.dtype), pos[1:]], dim=0)
        return self.ln_pre(x + pos), (H, W)

    def forward_dense(self, x, readout: str = "denseclip"):
        """-> ([x1..x4] or [], z̄ (B, D) or None, z (B, D, H, W) or None); readout "denseclip" (the last block's
        tokens) or "maskclip" (z from the last block run on its value path; z̄ unchanged)."""
        check_readout(readout)
        x, (H, W) = self._tokens(x)
        B = x.shape[0]
        feats = []
        last = len(self.transformer.resblocks) - 1
        for i, block in enumerate(self.transformer.resblocks):
            if i == last and readout == "maskclip" and hasattr(self, "proj"):
                values = self.ln_post(block.forward_values(x)[:, 1:]) @ self.proj  # (B, N, D)
            x = block(x)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, -1, H, W))  # (B, C, H, W)
        if hasattr(self, "fpn1"):
            feats = [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]
        if not hasattr(self, "proj"):
            return feats, None, None
        x = self.ln_post(x) @ self.proj  # (B, 1+N, D)
        dense = values if readout == "maskclip" else x[:, 1:]  # (B, N, D)
        return feats, x[:, 0], dense.transpose(1, 2).reshape(B, -1, H, W)

    def forward(self, x):
        x, _ = self._tokens(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, D)


# ----------------------------------------------------------------------------- TextEncoder
class TextEncoder(nn.Module):
    """CLIP's causal text transformer, optionally with learnable contexts (CoOp, DenseCLIP Sec. 3.3).

    forward(text (K, L_t), contexts=None (G, M, width)) -> (K, D), or (G, K, D) with contexts.
    Contexts go right after the start token: [SOT, ctx_1..ctx_M, name tokens, EOT, pad]; the
    end-of-text index (the largest id, as in CLIP) shifts by M. The sequence must fit the positional
    embedding, which is used up to the sequence length (77 in CLIP, 13 = 5 + 8 in DenseCLIP).
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512,
                 heads: int = 8, layers: int = 12, embed_dim: int = 512):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialisation (CLIP.initialize_parameters)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, text: torch.Tensor, contexts: Optional[torch.Tensor] = None):
        K = text.shape[0]
        x = self.token_embedding(text)  # (K, L_t, width)
        eot = text.argmax(dim=-1)  # (K,)
        G = 1
        if contexts is not None:
            G, M, C = contexts.shape
            x = x.unsqueeze(0).expand(G, -1, -1, -1)  # (G, K, L_t, C)
            ctx = contexts.to(x.dtype).unsqueeze(1).expand(-1, K, -1, -1)  # (G, K, M, C)
            x = torch.cat([x[:, :, :1], ctx, x[:, :, 1:]], dim=2).flatten(0, 1)  # (G*K, L, C)
            eot = (eot + M).repeat(G)  # (G*K,)
        L = x.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"text of {L} tokens does not fit the {self.positional_embedding.shape[0]} positions")
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.ln_final(self.transformer(x, causal=True))  # (G*K, L, C)
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (G*K, D)
        return x if contexts is None else x.view(G, K, -1)


# ----------------------------------------------------------------------------- CLIP
class CLIP(nn.Module):
    """Both towers and the logit scale. State dict keys are OpenAI's except that text-tower keys
    gain the prefix `text.` (see `openai_to_ours`)."""

    def __init__(self, visual: nn.Module, text: TextEncoder):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init temperature 0.07

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        return self.text(text)

    def forward(self, image, text):
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()  # (B, K)
        return logits, logits.t()


# The JIT archives carry these as state; they are architecture facts read off the weights instead.
_ARCHIVE_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_openai_state_dict(path: str) -> dict:
    """State dict of an OpenAI CLIP file: a TorchScript archive (what OpenAI distributes; loading one
    runs no Python pickle code) or a plain state dict, read with weights_only=True. fp16 -> fp32."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; OpenAI's files use it
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in _ARCHIVE_ONLY_KEYS}


def openai_to_ours(sd: dict) -> dict:
    """OpenAI key names -> CLIP's: the text tower's top-level keys move under `text.`."""
    return {k if k.startswith("visual.") or k == "logit_scale" else "text." + k: v for k, v in sd.items()}


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def clip_architecture(sd: dict) -> dict:
    """Read the architecture off OpenAI-named weights (as OpenAI's build_model does)."""
    text = dict(context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                width=sd["ln_final.weight"].shape[0], heads=sd["ln_final.weight"].shape[0] // 64,
                layers=_count(sd, "transformer.resblocks."), embed_dim=sd["text_projection"].shape[1])
    if "visual.proj" in sd:
        width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        visual = dict(kind="vit", input_resolution=patch * grid, patch_size=patch, width=width,
                      layers=_count(sd, "visual.transformer.resblocks."), heads=width // 64,
                      output_dim=sd["visual.proj"].shape[1])
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
        visual = dict(kind="resnet", layers=[_count(sd, f"visual.layer{i}.") for i in range(1, 5)], width=width,
                      heads=width * 32 // 64, input_resolution=grid * 32,
                      output_dim=sd["visual.attnpool.c_proj.weight"].shape[0])
    return dict(visual=visual, text=text)


def build_visual(kind: str, **cfg) -> nn.Module:
    return VisionTransformer(**cfg) if kind == "vit" else ModifiedResNet(**cfg)


def load_clip(path_or_state_dict: Union[str, dict]) -> CLIP:
    """OpenAI CLIP from a `.pt` archive, a state dict file, or a state dict with OpenAI key names.
    The architecture is inferred from the weights; loading is strict. Returns an fp32 model in eval."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = read_openai_state_dict(sd)
    sd = {k: v for k, v in sd.items() if k not in _ARCHIVE_ONLY_KEYS}
    arch = clip_architecture(sd)
    model = CLIP(build_visual(**arch["visual"]), TextEncoder(**arch["text"]))
    model.load_state_dict(openai_to_ours(sd), strict=True)
    return model.float().eval()
