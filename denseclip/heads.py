"""The Semantic FPN head (Kirillov et al. 2019) as mmseg's `FPNHead`: the decoder on top of the FPN neck.

Parameter names are mmcv's (`scale_heads.1.0.conv.weight`, `scale_heads.1.0.bn.weight`, `conv_seg.weight`), so
official DenseCLIP checkpoints load without renaming. Differs from mmseg: no mmcv (ConvModule written out here), and
the head has no loss of its own (the segmentor computes it).
Shape letters: B batch, C channels, K classes, H W input size.
"""
import math
from typing import Sequence

import torch.nn.functional as F
from torch import nn


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
            x = x + F.interpolate(head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(x))  # (B, K, H/4, W/4)
