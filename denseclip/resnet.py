"""CLIP's ResNet image encoder (ModifiedResNet) with the attention pool run densely (DenseCLIP Sec. 3.2: z̄ and z).

Mirrors OpenAI CLIP's `ModifiedResNet` / `AttentionPool2d` and keeps every parameter name, so OpenAI `.pt` archives
and official DenseCLIP checkpoints load strictly. What differs from OpenAI's code:
- `AttentionPool2d` uses every spatial position as a query, not only the mean token, and returns both the pooled
  feature z̄ (identical to CLIP's) and the dense map z. Its positional embedding is resized bilinearly when the
  feature grid differs from training, or, with `crop_pos_embed` (the official detection code), cropped to the grid.
- `ModifiedResNet.forward_dense` also returns the four pyramid levels x1..x4 (strides 4..32).
- `readout="maskclip"` swaps z for MaskCLIP's (Zhou et al., ECCV 2022): each position through the attention
  pool's v_proj and c_proj only (no positional embedding, as MaskCLIP's head). Zero-shot segmentation uses it.
Attention is batch-first through `F.scaled_dot_product_attention`. The file imports only torch: it copies out alone.
Shape letters: B batch, C channels, H W feature grid, N = H*W positions, D output (joint) dimension.
"""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def pos_embed_to_grid(pos: torch.Tensor, grid: Tuple[int, int], crop: bool = False) -> torch.Tensor:
    """(1 + S*S, C) positional embedding -> (1 + H*W, C): the mean slot is kept, and the square S x S grid is
    resized bilinearly (align_corners=False, as the official segmentation code; clip.py's resize_pos_embed does the
    same for the ViT, written again here so that this file copies out alone), or with `crop` cut to its top-left
    H x W block as is, what the official DenseCLIP detection backbone does (its checkpoints were trained that way;
    the grid is stored at 1344 // 32 = 42, the largest padded input)."""
    n, C = pos.shape
    S = math.isqrt(n - 1)
    H, W = grid
    if crop:
        if H > S or W > S:
            raise ValueError(f"feature grid {H}x{W} exceeds the stored {S}x{S} positional grid: raise "
                             f"input_resolution to at least {32 * max(H, W)} or resize the input smaller")
        spatial = pos[1:].reshape(S, S, C)[:H, :W].reshape(H * W, C)  # (H*W, C)
    else:  # also at the stored size, where the resize is exactly the identity: one traced graph serves every size
        spatial = pos[1:].reshape(1, S, S, C).permute(0, 3, 1, 2)  # (1, C, S, S)
        spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
        spatial = spatial.flatten(2).transpose(1, 2)[0]  # (H*W, C)
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


class AttentionPool2d(nn.Module):
    """CLIP's QKV attention pooling, run with every position as a query (DenseCLIP Sec. 3.2).

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
        pos = pos_embed_to_grid(self.positional_embedding, (H, W), self.crop_pos_embed)  # (1+N, C)
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
        if readout not in ("denseclip", "maskclip"):
            raise ValueError(f"unknown dense read-out {readout!r}; expected 'denseclip' or 'maskclip'")
        feats = self.forward_pyramid(x)
        if self.attnpool is None:
            return feats, None, None
        z_global, z_dense = self.attnpool(feats[-1])
        if readout == "maskclip":
            z_dense = self.attnpool.forward_values(feats[-1])
        return feats, z_global, z_dense

    def forward(self, x):
        return self.attnpool(self.forward_pyramid(x)[-1])[0]  # (B, D)
