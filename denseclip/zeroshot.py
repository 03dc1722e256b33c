"""Zero-shot segmentation from raw CLIP weights: no training, class names in, per-pixel class probabilities out,
by the evaluation protocol that the training-free papers share (MaskCLIP, Zhou et al. ECCV 2022; SCLIP, Wang et al.
ECCV 2024; ClearCLIP, Lan et al. ECCV 2024; NACLIP, Hajimiri et al. WACV 2025): the starting point DenseCLIP improves
on by training.

    clip = load_clip("pretrained/ViT-B-16.pt")
    model = ZeroShotSegmenter(clip, ["sky", "person, man, woman"], ZeroShotConfig(readout="naclip"))
    probs = model.predict(images)  # (B, K, H, W)

Text side: OpenAI's prompt ensembling (CLIP paper Sec. 3.1.4), as all four papers' code: each name in the 80
ImageNet templates, every sentence through CLIP's text encoder, L2-normalised, averaged, normalised again. A class
name may hold synonyms separated by commas ("person, man, woman"): each is one text query, and the class scores as
its best synonym. Image side: a dense read-out of the image tower, `readout` (READOUTS): for CLIP's ViT the last
block replaced as in readouts.py (vanilla, maskclip, sclip, clearclip, naclip); for CLIP's ResNet the attention pool
run at every position (vanilla, the z the DenseCLIP segmentor starts from; also called denseclip) or its value path
(maskclip), resnet.py's. Score map: language.py's `score_map` (cosines, the segmentor's), times `logit_scale`.

The protocol (`predict`), as SCLIP's / NACLIP's / ClearCLIP's segmentor code computes it:
1. logits per text query, in sliding windows (test_crop, test_stride; inference.py's slide, mmseg's) or on the
   whole image, each window's patch grid upsampled bilinearly to the window and averaged where windows overlap;
   upsampled to the label's size (the dataset's test transform has resized the image to a short side first);
2. softmax over all text queries (synonyms included), then each class takes its best synonym's probability;
3. optional SCLIP area rule (area_threshold): a class predicted on too small a share of the non-background pixels
   of the image is dropped there (SCLIP's VOC21 setting);
4. optional background threshold (bg_threshold): a pixel whose best class probability is below it becomes the
   background class (datasets with one: VOC21, Context60, COCO-Object in the papers).
Optional between 1 and 2: PAMR (pamr_steps; `pamr`), the refinement of the logits by the image's local affinities
that NACLIP's published numbers use (its code's default) and SCLIP's do not (its default: off).
Not here: fp16 (the official codes run CLIP in half precision on GPU; here the model's dtype, or eval.py --amp).
Shape letters: B batch, Q text queries (K classes and their synonyms), K classes, D joint dim, h w the patch grid.
"""
import functools
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import inference, language, readouts
from .clip import CLIP, TextEncoder, VisionTransformer
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
# The dense read-outs: every one on CLIP's ViT (readouts.py); on CLIP's ResNet, the two of resnet.py.
READOUTS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "denseclip")
RESNET_READOUTS = {"vanilla": "denseclip", "denseclip": "denseclip", "maskclip": "maskclip"}


def check_readout(readout: str, visual: nn.Module = None):
    """A known read-out, and one the tower has (SCLIP, ClearCLIP and NACLIP change a transformer block)."""
    if readout not in READOUTS:
        raise ValueError(f"unknown dense read-out {readout!r}; expected one of {', '.join(READOUTS)}")
    if visual is not None and not isinstance(visual, VisionTransformer) and readout not in RESNET_READOUTS:
        raise ValueError(f"read-out {readout!r} changes the last block of CLIP's ViT; this CLIP has a ResNet image "
                         f"tower, which has {', '.join(sorted(RESNET_READOUTS))}")


@dataclass
class ZeroShotConfig:
    readout: str = "maskclip"  # dense read-out of the image tower, one of READOUTS (module docstring)
    templates: str = "imagenet"  # "imagenet": OpenAI's 80 templates averaged (all four papers); "photo": one
    test_mode: str = "slide"  # "slide" windows of test_crop (the papers'), or the "whole" image at once
    test_crop: int = 224  # window side: CLIP's input size (ViT-B/16: 224, SCLIP's and NACLIP's; ClearCLIP 448)
    test_stride: int = 112  # window stride: half the window (SCLIP's and NACLIP's 112; ClearCLIP 224)
    logit_scale: float = 40.0  # cosines x this before the softmax: SCLIP's and NACLIP's 40 (ClearCLIP 50)
    bg_threshold: float = 0.0  # > 0: pixels whose best class probability is below become `background` (off: 0)
    area_threshold: float = 0.0  # > 0: SCLIP's area rule (its VOC21 setting 0.1); off: 0
    background: int = 0  # the class that low-confidence pixels become (first in every mmseg dataset that has one)
    neighbourhood_std: float = 5.0  # NACLIP's Gaussian prior, std in patches (its code's default and runs)
    pamr_steps: int = 0  # > 0: PAMR iterations on the logits (NACLIP's runs: 10); off: 0
    pamr_dilations: Tuple[int, ...] = (8, 16)  # PAMR's neighbourhood dilations (NACLIP's, SCLIP's)
    pos_interpolation: str = "bicubic"  # ViT positional-grid resize: the papers' (DINO's); clip.resize_pos_embed
    ignore_index: int = 255  # label value that no metric counts

    @property
    def tau(self) -> float:
        """1 / logit_scale: logits x tau are cosines (what demo.py's score maps draw)."""
        return 1.0 / self.logit_scale


def split_synonyms(class_names: Sequence[str]) -> Tuple[list, list]:
    """Class names with comma-separated synonyms -> (text queries, class index of each query), as the papers'
    class-name files (one class a line: "person, person in shirt, ..."). Spaces around each synonym are dropped."""
    queries, query_class = [], []
    for k, name in enumerate(class_names):
        parts = [p.strip() for p in str(name).split(",")]
        if not all(parts):
            raise ValueError(f"class {k} {name!r}: an empty synonym (names are separated by single commas)")
        queries += parts
        query_class += [k] * len(parts)
    return queries, query_class


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


# ----------------------------------------------------------------------------- the protocol's steps
def best_synonym(scores: torch.Tensor, query_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, Q, H, W) query probabilities (or logits) -> (B, K, H, W): each class the maximum over its queries."""
    B, Q, H, W = scores.shape
    if Q == num_classes and bool((query_class == torch.arange(Q, device=query_class.device)).all()):
        return scores
    index = query_class.to(scores.device).view(1, Q, 1, 1).expand(B, Q, H, W)
    out = scores.new_full((B, num_classes, H, W), float("-inf"))
    return out.scatter_reduce(1, index, scores, reduce="amax")  # (B, K, H, W)


def drop_small_classes(probs: torch.Tensor, area_threshold: float, background: int = 0) -> torch.Tensor:
    """SCLIP's area rule, per image: a class (other than the background) whose argmax area is at most
    `area_threshold` x the area of all non-background argmax pixels gets probability 0 everywhere, so that its
    pixels go to the next best class. (B, K, H, W) -> (B, K, H, W)."""
    K = probs.shape[1]
    area = F.one_hot(probs.argmax(1), K).sum(dim=(1, 2)).to(probs.dtype)  # (B, K) pixels per predicted class
    area[:, background] = 0
    keep = area > area_threshold * area.sum(dim=1, keepdim=True)  # (B, K)
    keep[:, background] = True
    return probs * keep[:, :, None, None].to(probs.dtype)


def low_confidence_to_background(probs: torch.Tensor, threshold: float, background: int = 0) -> torch.Tensor:
    """Pixels whose best class probability is below `threshold` become the background class: their probabilities
    are replaced by a one-hot of `background` (the papers set the predicted label; this keeps argmax meaningful)."""
    low = probs.max(dim=1, keepdim=True).values < threshold  # (B, 1, H, W)
    onehot = F.one_hot(torch.tensor(background, device=probs.device), probs.shape[1]).to(probs.dtype)  # (K,)
    return torch.where(low, onehot.view(1, -1, 1, 1), probs)  # (B, K, H, W)


def pamr(image: torch.Tensor, logits: torch.Tensor, steps: int, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """PAMR (Araslanov & Roth, CVPR 2020, "Single-Stage Semantic Segmentation from Image Labels"), as NACLIP runs
    it: `steps` times, every pixel's logits become the affinity-weighted mean of its 8 neighbours' at each dilation
    (replicate padding). The affinity of a neighbour: softmax over the neighbours of -|x - x_n| / (0.1 std), the
    image difference scaled by the local standard deviation (over the 3 x 3 neighbourhood with the pixel itself, at
    every dilation), averaged over the colour channels. image (B, 3, H, W) normalised, logits (B, Q, H, W)."""
    H, W = image.shape[-2:]
    pad = max(dilations)
    ring = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    square = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

    def shifted(t, offsets):  # (B, C, H, W) -> (B, C, P, H, W): t at each offset, edges replicated
        t = F.pad(t, [pad] * 4, mode="replicate")
        return torch.stack([t[..., pad + y:pad + y + H, pad + x:pad + x + W] for y, x in offsets], dim=2)

    std = shifted(image, square).std(dim=2, keepdim=True)  # (B, 3, 1, H, W)
    affinity = -(image[:, :, None] - shifted(image, ring)).abs() / (1e-8 + 0.1 * std)  # (B, 3, P, H, W)
    affinity = affinity.mean(dim=1, keepdim=True).softmax(dim=2)  # (B, 1, P, H, W)
    for _ in range(steps):
        logits = (shifted(logits, ring) * affinity).sum(dim=2)  # (B, Q, H, W)
    return logits


# ----------------------------------------------------------------------------- the model
class ZeroShotSegmenter(nn.Module):
    """CLIP's image tower + ensembled text features of the class names (synonyms allowed). model(images) -> logits
    per text query (B, Q, H, W) at input size (Q = K without synonyms); predict(images, ...) -> class probabilities
    by the protocol (module docstring), as the DenseCLIP segmentor's predict. The text tower is kept, so that
    predict(names=...) and score_logits(names=...) take any other names (open vocabulary, demo.py's score maps).
    The CLIP's ViT is shared, not copied: its pos_interpolation is set to cfg's."""

    def __init__(self, clip: CLIP, class_names: Sequence[str], cfg: ZeroShotConfig = None):
        super().__init__()
        res = clip.visual.input_resolution
        self.cfg = cfg = cfg or ZeroShotConfig(test_crop=res, test_stride=res // 2)
        check_readout(cfg.readout, clip.visual)
        if cfg.templates not in TEMPLATES:
            raise ValueError(f"unknown templates {cfg.templates!r}; expected one of {sorted(TEMPLATES)}")
        self.class_names = [str(n).strip() for n in class_names]
        self.num_classes = len(self.class_names)
        if cfg.bg_threshold and not 0 <= cfg.background < self.num_classes:
            raise ValueError(f"background class {cfg.background} is not one of the {self.num_classes} classes")
        self.visual, self.text = clip.visual, clip.text
        if isinstance(self.visual, VisionTransformer):
            self.visual.pos_interpolation = cfg.pos_interpolation
        text, query_class, _ = self.encode(self.class_names)
        self.register_buffer("text_embeddings", text)  # (1, Q, D), computed once
        self.register_buffer("query_class", query_class)  # (Q,) the class of each text query

    def encode(self, names: Sequence[str]):
        """Names (with synonyms) -> (text features (1, Q, D), class of each query (Q,), number of classes)."""
        queries, query_class = split_synonyms(names)
        text = ensemble_text_features(self.text, queries, TEMPLATES[self.cfg.templates])  # (Q, D)
        return text[None], torch.tensor(query_class, device=text.device), len(names)

    def dense_features(self, images):
        """The read-out z (B, D, h, w). A ViT sees the image cropped to whole patches (its convolution would drop
        the remainder anyway, as in the papers' code); the caller stretches the score map over the whole image."""
        if not isinstance(self.visual, VisionTransformer):
            return self.visual.forward_dense(images, RESNET_READOUTS[self.cfg.readout])[2]
        p = self.visual.patch_size
        x = images[..., :images.shape[-2] // p * p, :images.shape[-1] // p * p]
        last = readouts.VIT_READOUTS["vanilla" if self.cfg.readout == "denseclip" else self.cfg.readout]
        if last is readouts.naclip:
            last = functools.partial(last, std=self.cfg.neighbourhood_std)
        return self.visual.forward_dense(x, last)[2]

    def forward(self, images, text=None):
        """Logits per text query (B, Q, H, W): cosines x logit_scale, upsampled to the input size."""
        z_dense = self.dense_features(images)  # (B, D, h, w)
        text = (self.text_embeddings if text is None else text).to(z_dense.dtype).expand(len(images), -1, -1)
        score = language.score_map(z_dense, text)  # (B, Q, h, w) cosines
        return resize(score * self.cfg.logit_scale, images.shape[-2:])  # (B, Q, H, W)

    def score_logits(self, images, names: Sequence[str] = None):
        """Class logits (B, K, H, W) at input size: each class its best synonym's logit (names: any other names)."""
        text, query_class, K = (self.text_embeddings, self.query_class, self.num_classes) if names is None \
            else self.encode(names)
        return best_synonym(self(images, text), query_class, K)  # (B, K, H, W)

    @torch.no_grad()
    def predict(self, images, out_size=None, ratios: Sequence[float] = (1.0,), flip: bool = False, mode=None,
                names: Sequence[str] = None):
        """Class probabilities (B, K, *out_size) by the protocol (module docstring). Scales and flips average the
        query softmax, as the DenseCLIP segmentor's predict (inference.py). names: other class names; the area
        and background rules then do not apply (they concern the dataset's classes)."""
        cfg = self.cfg
        text, query_class, K = (self.text_embeddings, self.query_class, self.num_classes) if names is None \
            else self.encode(names)
        forward = functools.partial(self, text=text)
        refine = functools.partial(pamr, steps=cfg.pamr_steps, dilations=cfg.pamr_dilations) if cfg.pamr_steps \
            else None
        probs = inference.predict(forward, images, mode or cfg.test_mode, cfg.test_crop, cfg.test_stride, out_size,
                                  ratios, flip, refine)  # (B, Q, H, W) softmax over the text queries
        probs = best_synonym(probs, query_class, K)  # (B, K, H, W)
        if names is None and cfg.area_threshold > 0:
            probs = drop_small_classes(probs, cfg.area_threshold, cfg.background)
        if names is None and cfg.bg_threshold > 0:
            probs = low_confidence_to_background(probs, cfg.bg_threshold, cfg.background)
        return probs
