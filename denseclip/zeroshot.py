"""Zero-shot segmentation from raw CLIP weights: no training, class names in, per-pixel argmax of the pixel-text
score map out (the starting point DenseCLIP improves on; MaskCLIP, Zhou et al., ECCV 2022).

    clip = load_clip("pretrained/RN50.pt")
    model = ZeroShotSegmenter(clip, ["wall", "sky", "person"])   # model.predict(images) -> (B, K, H, W)

Text side: OpenAI's prompt ensembling (CLIP paper Sec. 3.1.4): each name in the 80 ImageNet templates, every
sentence through CLIP's text encoder, L2-normalised, averaged, normalised again; fixed, so only the features are
kept (buffer `text_embeddings`), not the text tower, and there are no learned contexts or prompting. Image side: a
dense read-out of clip.py's towers, `readout="maskclip"` (value path only, MaskCLIP's) or "denseclip" (every
position a query of the attention pool, what the DenseCLIP segmentor starts from). The score map is language.py's
`score_map` (cosines), the one the segmentor uses; logits are it times CLIP's logit scale. Inference (whole image or
slide windows, scales, flips) is inference.py's `predict`, the segmentor's too, so eval.py's mIoU code runs on it.
"""
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inference, language
from .clip import CLIP, TextEncoder, check_readout
from .inference import resize
from .tokenizer import tokenize

# OpenAI's 80 ImageNet prompt templates, in their order, from the CLIP repository's notebook
# notebooks/Prompt_Engineering_for_ImageNet.ipynb (MIT licence, see LICENSE-CLIP-BPE for OpenAI's notice).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
TEMPLATES = {"imagenet": IMAGENET_TEMPLATES, "photo": ("a photo of a {}.",)}


@dataclass
class ZeroShotConfig:
    readout: str = "maskclip"  # dense read-out of the image tower: "maskclip" or "denseclip" (see clip.py)
    templates: str = "imagenet"  # "imagenet": OpenAI's 80 templates averaged; "photo": "a photo of a {}." only
    test_mode: str = "whole"  # "whole" image at once, or "slide" windows of test_crop
    test_crop: int = 224  # slide window: CLIP's own input size (the pretrained positional grid)
    test_stride: int = 149  # 2/3 of the crop, the overlap of the official 512 / 341 slide
    ignore_index: int = 255  # label value that no metric counts


@torch.no_grad()
def ensemble_text_features(text_encoder: TextEncoder, class_names: Sequence[str], templates: Sequence[str]):
    """(K, D): per class, the normalised mean of the normalised features of `templates` filled with its name."""
    device = text_encoder.text_projection.device
    out = []
    for name in class_names:
        tokens = tokenize([t.format(name.strip()) for t in templates], text_encoder.context_length).to(device)
        feats = F.normalize(text_encoder(tokens), dim=-1)  # (T, D)
        out.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(out)  # (K, D)


class ZeroShotSegmenter(nn.Module):
    """CLIP's image tower + fixed ensembled text features. model(images) -> logits (B, K, H, W) at input size;
    predict(images, ...) -> class probabilities, as the DenseCLIP segmentor's (without open-vocabulary names)."""

    def __init__(self, clip: CLIP, class_names: Sequence[str], cfg: ZeroShotConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or ZeroShotConfig(test_crop=clip.visual.input_resolution,
                                               test_stride=clip.visual.input_resolution * 2 // 3)
        check_readout(cfg.readout)
        if cfg.templates not in TEMPLATES:
            raise ValueError(f"unknown templates {cfg.templates!r}; expected one of {sorted(TEMPLATES)}")
        self.class_names = [n.strip() for n in class_names]
        self.num_classes = len(self.class_names)
        self.visual = clip.visual
        text = ensemble_text_features(clip.text, self.class_names, TEMPLATES[cfg.templates])  # (K, D)
        self.register_buffer("text_embeddings", text[None])  # (1, K, D)
        self.register_buffer("logit_scale", clip.logit_scale.detach().exp())  # CLIP's learned 1 / temperature

    def forward(self, images):
        z_dense = self.visual.forward_dense(images, self.cfg.readout)[2]  # z (B, D, h, w)
        text = self.text_embeddings.to(z_dense.dtype).expand(len(images), -1, -1)  # (B, K, D)
        score = language.score_map(z_dense, text)  # (B, K, h, w) cosines
        return resize(score * self.logit_scale, images.shape[-2:])  # (B, K, H, W)

    @torch.no_grad()
    def predict(self, images, out_size=None, ratios: Sequence[float] = (1.0,), flip: bool = False, mode=None):
        """Class probabilities (B, K, *out_size), as the DenseCLIP segmentor's predict (inference.py)."""
        return inference.predict(self, images, mode or self.cfg.test_mode, self.cfg.test_crop, self.cfg.test_stride,
                                 out_size, ratios, flip)
