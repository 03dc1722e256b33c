"""The training-free read-outs of CLIP's ViT (denseclip/readouts.py) against each paper's formula, written out here
on the modules of OpenAI's implementation (clip-anytorch) with the same random weights, in float64: vanilla CLIP,
MaskCLIP, SCLIP, ClearCLIP, NACLIP. Two image sizes (the stored 4 x 4 grid, and a 4 x 6 grid whose positional
embedding is resized as the papers' code resizes it). Each formula has switches (attention kind, residual,
feed-forward, NACLIP's prior); flipping any one of them gives an output ours is far from, so a read-out that kept
the residual where its method drops it, or took q kᵀ for q qᵀ, would fail the parity test."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from peers import openai_clip

from denseclip import readouts
from denseclip.checkpoint import load_clip
from denseclip.zeroshot import ZeroShotConfig, ZeroShotSegmenter

# What each method keeps of CLIP's last block, as its official code does (readouts.py's table).
FORMULAS = {
    "vanilla": dict(attention="qk", residual=True, ffn=True),
    "maskclip": dict(attention="identity", residual=True, ffn=True),
    "sclip": dict(attention="qq+kk", residual=True, ffn=True),
    "clearclip": dict(attention="qq", residual=False, ffn=False),
    "naclip": dict(attention="kk+prior", residual=False, ffn=False),
}
STD = 5.0  # NACLIP's default


def openai_vit_f64():
    """OpenAI's CLIP with a ViT (2 blocks, width 64, 2 heads, 64 px: a 4 x 4 grid) in float64. OpenAI's LayerNorm
    casts its input to float32 (for fp16 weights); here it runs as torch's LayerNorm, the same computation uncast."""
    torch.manual_seed(0)
    peer = openai_clip.model.CLIP(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64,
                                  vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=128,
                                  transformer_heads=2, transformer_layers=1).double().eval()
    for m in peer.modules():
        if isinstance(m, openai_clip.model.LayerNorm):
            m.__class__ = torch.nn.LayerNorm
    return peer


@pytest.fixture(scope="module")
def vit():
    """OpenAI's ViT and ours with its weights, in float64."""
    peer = openai_vit_f64()
    ours = load_clip(peer.state_dict()).double().eval().visual
    ours.pos_interpolation = "bicubic"  # the papers' resize, as ZeroShotSegmenter sets it
    return peer.visual, ours


def gaussian_prior(H, W, std):
    """NACLIP's ω over the 1 + H*W tokens, entry by entry: exp(-|p - p'|² / (2 std²)) between patches, 0 for the
    class token's row and column."""
    L = 1 + H * W
    prior = torch.zeros(L, L, dtype=torch.float64)
    for a in range(H * W):
        for b in range(H * W):
            (ia, ja), (ib, jb) = divmod(a, W), divmod(b, W)
            prior[1 + a, 1 + b] = math.exp(-((ia - ib) ** 2 + (ja - jb) ** 2) / (2 * std ** 2))
    return prior


def input_of_last_block(v, image):
    """OpenAI's ViT up to its last block: (B, 1+N, C), and the grid. Off the stored grid the positional embedding is
    resized as SCLIP / NACLIP's interpolate_pos_encoding does (bicubic, scale factors (h + 0.1) / S)."""
    x = v.conv1(image)  # (B, C, h, w)
    B, C, h, w = x.shape
    x = torch.cat([v.class_embedding.expand(B, 1, C), x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1+N, C)
    pos, S = v.positional_embedding, math.isqrt(v.positional_embedding.shape[0] - 1)
    if (h, w) != (S, S):
        grid = F.interpolate(pos[1:].reshape(1, S, S, C).permute(0, 3, 1, 2), mode="bicubic", align_corners=False,
                             scale_factor=((h + 0.1) / S, (w + 0.1) / S), recompute_scale_factor=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, C)])
    x = v.ln_pre(x + pos).permute(1, 0, 2)  # (1+N, B, C): OpenAI's layout
    return v.transformer.resblocks[:-1](x).permute(1, 0, 2), (h, w)


def reference(v, image, attention, residual, ffn, std=STD):
    """The paper's formula for the last block on OpenAI's modules, then ln_post and proj: (B, N, D)."""
    x, (H, W) = input_of_last_block(v, image)
    blk = v.transformer.resblocks[-1]
    B, L, C = x.shape
    h = blk.attn.num_heads
    d = C // h
    y = blk.ln_1(x)
    q, k, val = ((y @ blk.attn.in_proj_weight[i * C:(i + 1) * C].T + blk.attn.in_proj_bias[i * C:(i + 1) * C])
                 .view(B, L, h, d).transpose(1, 2) for i in range(3))  # 3 x (B, h, L, d)
    scale = d ** -0.5
    weights = {
        "qk": lambda: (q @ k.transpose(-1, -2) * scale).softmax(-1),
        "identity": lambda: torch.eye(L, dtype=x.dtype),
        "qq+kk": lambda: (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1),
        "qq": lambda: (q @ q.transpose(-1, -2) * scale).softmax(-1),
        "kk": lambda: (k @ k.transpose(-1, -2) * scale).softmax(-1),
        "kk+prior": lambda: (k @ k.transpose(-1, -2) * scale + gaussian_prior(H, W, std)).softmax(-1),
    }[attention]()  # (B, h, L, L)
    out = (weights @ val).transpose(1, 2).reshape(B, L, C) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    x = x + out if residual else out
    if ffn:
        x = x + blk.mlp(blk.ln_2(x))
    return v.ln_post(x[:, 1:]) @ v.proj  # (B, N, D)


def ours_dense(ours, image, name, std=STD):
    last = functools.partial(readouts.naclip, std=std) if name == "naclip" else readouts.VIT_READOUTS[name]
    z = ours.forward_dense(image, last_block=last)[2]  # (B, D, h, w)
    return z.flatten(2).transpose(1, 2)  # (B, N, D)


SIZES = [(64, 64), (64, 96)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_readout_is_its_papers_formula(vit, name, size):
    v, ours = vit
    torch.manual_seed(1)
    image = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got, want = ours_dense(ours, image, name), reference(v, image, **FORMULAS[name])
        z_global = ours.forward_dense(image, last_block=readouts.VIT_READOUTS[name])[1]
    assert got.shape == (2, size[0] // 16 * size[1] // 16, 32)
    assert (got - want).abs().max().item() <= 1e-10
    if size == (64, 64):  # z̄ stays CLIP's pooled feature with every read-out
        assert (z_global - v(image)).abs().max().item() <= 1e-10


def mutations():
    """Every formula with one switch flipped: residual, feed-forward, or the attention kind."""
    swaps = {"qk": "qq", "identity": "qk", "qq+kk": "qq", "qq": "qk", "kk+prior": "kk"}
    for name, f in sorted(FORMULAS.items()):
        yield name, dict(f, residual=not f["residual"]), "residual"
        yield name, dict(f, ffn=not f["ffn"]), "feed-forward"
        yield name, dict(f, attention=swaps[f["attention"]]), f"{f['attention']} -> {swaps[f['attention']]}"
    yield "naclip", dict(FORMULAS["naclip"], attention="qq+kk"), "kk+prior -> qq+kk"


@pytest.mark.parametrize("name, mutated, what", list(mutations()), ids=lambda x: x if isinstance(x, str) else "")
def test_the_parity_test_tells_each_mutation_apart(vit, name, mutated, what):
    """A read-out computing the mutated formula would be this far from the reference: orders of magnitude beyond
    the parity tolerance, so the parity test above fails on it."""
    v, ours = vit
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        got, wrong = ours_dense(ours, image, name), reference(v, image, **mutated)
    assert (got - wrong).abs().max().item() > 1e-4 * got.abs().max().item(), what


def test_naclip_prior_matches_the_official_convolution_and_its_std_matters(vit):
    """neighbourhood_prior equals NACLIP's construction (one-hot maps convolved with a (2H-1) x (2W-1) Gaussian
    window, 'same' padding, class token row and column 0) on a non-square grid; a narrower std changes the output."""
    H, W, std = 3, 5, 2.0
    ys = torch.arange(2 * H - 1, dtype=torch.float64) - (H - 1)
    xs = torch.arange(2 * W - 1, dtype=torch.float64) - (W - 1)
    window = torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * std ** 2))  # (2H-1, 2W-1)
    onehots = torch.eye(H * W, dtype=torch.float64).view(H * W, 1, H, W)
    conv = F.conv2d(onehots, window[None, None], padding="same").view(H * W, H * W)
    official = F.pad(conv, (1, 0, 1, 0))
    ours = readouts.neighbourhood_prior((H, W), std, torch.float64)
    assert (ours - official).abs().max().item() <= 1e-12
    assert (ours - gaussian_prior(H, W, std)).abs().max().item() <= 1e-12
    v, model = vit
    image = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        narrow = ours_dense(model, image, "naclip", std=1.0)
        assert (narrow - reference(v, image, **FORMULAS["naclip"], std=1.0)).abs().max().item() <= 1e-10
        assert (narrow - ours_dense(model, image, "naclip")).abs().max().item() > 1e-4


def test_segmenter_reads_out_through_the_named_readout_and_crops_to_whole_patches(vit):
    """ZeroShotSegmenter's dense features are the read-out of readouts.py (std from its config; 'denseclip' is the
    vanilla read-out on a ViT), on the image cropped to whole patches as the papers' convolution drops the rest."""
    peer = openai_vit_f64()
    clip = load_clip(peer.state_dict()).double().eval()
    image = torch.randn(1, 3, 70, 100, dtype=torch.float64)  # 4 x 6 whole patches and a remainder
    with torch.no_grad():
        for name, std in (("naclip", 2.0), ("denseclip", STD), ("clearclip", STD)):
            model = ZeroShotSegmenter(clip, ["a", "b"], ZeroShotConfig(readout=name, neighbourhood_std=std))
            want = ours_dense(model.visual, image[..., :64, :96], "vanilla" if name == "denseclip" else name, std)
            got = model.dense_features(image).flatten(2).transpose(1, 2)
            assert (got - want).abs().max().item() <= 1e-12
            assert (got - reference(peer.visual, image[..., :64, :96], **FORMULAS[name if name != "denseclip" else
                                                                                  "vanilla"], std=std)
                    ).abs().max().item() <= 1e-10
