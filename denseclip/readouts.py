"""Training-free dense read-outs of CLIP's ViT: what runs in place of the last transformer block when every patch
token, rather than the class token, is to be compared with text (zero-shot segmentation, zeroshot.py).

CLIP's ViT was trained to align only its class token with text; its patch tokens, read out as they are (`vanilla`),
give noisy, nearly uniform score maps. Each method here changes the last block alone, keeps all earlier blocks, and
leaves ln_post and proj to the caller (clip.py's `VisionTransformer.forward_dense(x, last_block=...)`), which applies
them to the tokens returned here, exactly as CLIP does. Every function has the signature

    last_block(block, x (B, 1+N, C), grid (H, W)) -> tokens (B, 1+N, C)

where `block` is the last ResidualAttentionBlock (CLIP's names: ln_1, attn.in_proj_weight / in_proj_bias /
out_proj, ln_2, mlp) and x its input. As in every official code, the class token stays in the attention (as a query
and as a key); only the patch tokens are read out afterwards. Attention logits are scaled by head_dim^-0.5, CLIP's
own scale, in all of them. What each keeps of the last block (the official code was read for each, and where the
paper and the code differ we follow the code):

    read-out    attention weights                     residual  feed-forward
    vanilla     softmax(q kᵀ)  (CLIP)                    yes        yes
    maskclip    identity: each token its own value       yes        yes
    sclip       softmax(q qᵀ) + softmax(k kᵀ)            yes        yes
    clearclip   softmax(q qᵀ)                            no         no
    naclip      softmax(k kᵀ + Gaussian prior)           no         no

Shape letters: B batch, L = 1+N tokens (class token first), N = H*W patches, C width, h heads, d = C/h.
Imports only torch, so the file copies out alone.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def _qkv(block, x):
    """Queries, keys and values of the block's attention on ln_1(x): 3 x (B, h, L, d)."""
    B, L, C = x.shape
    h = block.attn.heads
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)  # (B, L, 3C)
    return qkv.view(B, L, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)


def _merge(block, y):
    """Per-head attention outputs (B, h, L, d) -> the block's output projection (B, L, C)."""
    B, h, L, d = y.shape
    return block.attn.out_proj(y.transpose(1, 2).reshape(B, L, h * d))


def vanilla(block, x, grid: Tuple[int, int]):
    """CLIP's own last block on every token: the baseline every paper reports ("CLIP" in their tables)."""
    return block(x)


def maskclip(block, x, grid: Tuple[int, int]):
    """MaskCLIP (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP"): the last attention replaced by its
    value path, x + out_proj(v), then the block's feed-forward with its residual. The paper describes the ViT case
    as "the value embedding" passed on; the official code (mmseg/models/backbones/vit.py, return_qkv) computes
    v = out_proj(v_proj(ln_1(x))) + x and v = v + mlp(ln_2(v)), then the final norm and proj: the same as here
    (its mmseg port uses LayerNorm eps 1e-6 where CLIP has 1e-5; we keep CLIP's). ClearCLIP's re-implementation
    drops the residual and feed-forward instead; we follow MaskCLIP's own code."""
    v = _qkv(block, x)[2]  # (B, h, L, d)
    x = x + _merge(block, v)  # (B, L, C)
    return x + block.mlp(block.ln_2(x))


def sclip(block, x, grid: Tuple[int, int]):
    """SCLIP (Wang et al., ECCV 2024, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference"):
    correlative self-attention, whose weights softmax(q qᵀ) + softmax(k kᵀ) make tokens attend to tokens like
    themselves. The paper writes CSA with one projection W_r and, training-free, reuses W_q and W_k as two such
    projections summed. Its official code (clip/model.py, custom_attn with csa=True) keeps the last block's residual
    and feed-forward: x + out_proj(A v), then + mlp(ln_2(·)); so do we. (A + B) v = A v + B v, so it runs as two
    attentions."""
    q, k, v = _qkv(block, x)
    y = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)  # (B, h, L, d)
    x = x + _merge(block, y)  # (B, L, C)
    return x + block.mlp(block.ln_2(x))


def clearclip(block, x, grid: Tuple[int, int]):
    """ClearCLIP (Lan et al., ECCV 2024, "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language
    Inference"): query-query attention, and the last block's residual and feed-forward removed; the output is
    out_proj(softmax(q qᵀ) v) alone, then ln_post and proj. Paper and official code agree (open_clip/transformer.py,
    model_type 'ClearCLIP' with ignore_residual=True; note that its configs/base_config.py ships
    model_type='vanilla', the ablation, while its demo.py sets 'ClearCLIP'). Its code runs CLIP in fp16."""
    q, _, v = _qkv(block, x)
    return _merge(block, F.scaled_dot_product_attention(q, q, v))  # (B, L, C)


def neighbourhood_prior(grid: Tuple[int, int], std: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """NACLIP's Gaussian neighbourhood kernel (L, L), added to the attention logits: between patches p = (i, j) and
    p' = (i', j') of the H x W grid, exp(-((i - i')² + (j - j')²) / (2 std²)), at most 1 (a patch and itself);
    the class token's row and column are 0 (no prior). The official code builds it by convolving one-hot maps with
    a (2H-1) x (2W-1) Gaussian window, which gives exactly these values."""
    H, W = grid
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    pos = torch.stack([i.flatten(), j.flatten()], dim=1)  # (N, 2) row, column of each patch, row-major
    prior = torch.exp(-torch.cdist(pos, pos).square() / (2 * std ** 2))  # (N, N)
    return F.pad(prior, (1, 0, 1, 0)).to(dtype=dtype, device=device)  # (L, L): class token first, no prior


def naclip(block, x, grid: Tuple[int, int], std: float = 5.0):
    """NACLIP (Hajimiri et al., WACV 2025, "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
    Segmentation"): key-key attention with a Gaussian neighbourhood prior added to its logits,
    softmax(k kᵀ / sqrt(d) + ω) (neighbourhood_prior; the same ω for every head), and the last block reduced: no
    residual, no feed-forward (the paper's "reduced architecture"). Official code (clip/model.py, arch 'reduced',
    attn_strategy 'naclip'): the same; it changes no earlier block; std 5 patches is its default and the value of its
    published runs (test_all.sh ... naclip 5). Its published numbers add PAMR post-processing (pamr_steps=10 by
    default in naclip.py): not part of the read-out, it is a step of the protocol (zeroshot.py's `pamr`)."""
    q, k, v = _qkv(block, x)
    prior = neighbourhood_prior(grid, std, x.dtype, x.device)  # (L, L)
    return _merge(block, F.scaled_dot_product_attention(k, k, v, attn_mask=prior))  # (B, L, C)


VIT_READOUTS = {"vanilla": vanilla, "maskclip": maskclip, "sclip": sclip, "clearclip": clearclip, "naclip": naclip}
