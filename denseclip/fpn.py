"""The FPN neck (Lin et al. 2017) as mmdet 2.17 and mmseg write it, shared by the segmentor and the detectors.

    inputs C_start..C_last -> 1x1 laterals -> top-down: lat[i-1] += nearest-upsample(lat[i]) -> 3x3 outputs
    then num_outs - #laterals extra levels (detection only):
      add_extra_convs "on_input"   P6 = conv3x3/2(C_last), P7 = conv3x3/2(P6)      (RetinaNet)
      add_extra_convs ""           P6 = max_pool(P5, 1, stride 2)                   (Mask R-CNN)

mmseg's FPN is this class with num_outs = number of inputs (no extra level), which is what the segmentor uses.
Parameter names are mmcv ConvModule's (`lateral_convs.0.conv.weight`, `fpn_convs.3.conv.bias`), so official
checkpoints load without renaming. Differs from torchvision's FeaturePyramidNetwork + LastLevelP6P7, which always
puts a ReLU before P7.
"""
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    """A bare conv under mmcv ConvModule's name `conv` (the FPN's convs have neither norm nor activation)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2)))


class FPN(nn.Module):
    """Laterals (1x1) on inputs start_level.., nearest top-down sum, 3x3 outputs; then num_outs - len(laterals)
    extra levels: with add_extra_convs a stride-2 3x3 conv on the last input ("on_input"), the last lateral or
    the last output, followed by stride-2 3x3 convs on the previous extra level (ReLU before them only if
    relu_before_extra_convs); without it a stride-2 subsampling of the last output (F.max_pool2d(x, 1, stride=2)).
    num_outs defaults to the number of laterals (mmseg's neck). Xavier-uniform init, zero bias."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: Optional[int] = None,
                 start_level: int = 0, add_extra_convs: str = "", relu_before_extra_convs: bool = False):
        super().__init__()
        if add_extra_convs not in ("", "on_input", "on_lateral", "on_output"):
            raise ValueError(f"add_extra_convs must be '', 'on_input', 'on_lateral' or 'on_output', not "
                             f"{add_extra_convs!r}")
        n = len(in_channels) - start_level
        num_outs = n if num_outs is None else num_outs
        if num_outs < n:
            raise ValueError(f"num_outs {num_outs} < {n} levels from start_level {start_level}")
        self.start_level, self.num_outs = start_level, num_outs
        self.add_extra_convs, self.relu_before_extra_convs = add_extra_convs, relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in range(n))
        if add_extra_convs:
            for i in range(num_outs - n):
                cin = in_channels[-1] if i == 0 and add_extra_convs == "on_input" else out_channels
                self.fpn_convs.append(_conv(cin, out_channels, 3, stride=2))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats[self.start_level:])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        n = len(lat)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        if not self.add_extra_convs:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return outs
        if self.num_outs > n:
            source = {"on_input": feats[-1], "on_lateral": lat[-1], "on_output": outs[-1]}[self.add_extra_convs]
            outs.append(self.fpn_convs[n](source))
            for conv in self.fpn_convs[n + 1:]:
                outs.append(conv(F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]))
        return outs
