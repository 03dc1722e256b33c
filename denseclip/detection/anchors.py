"""mmdet 2.17's anchor generator in torchvision's interface, for RetinaNet's head and Mask R-CNN's RPN.
Shape letters: A anchors per position (ratios x scales), h w a feature level's grid."""
from typing import List, Sequence

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator


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
