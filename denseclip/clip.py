"""CLIP's transformer towers and the CLIP model, with the dense outputs DenseCLIP needs (paper Sec. 3.1-3.2).

Mirrors OpenAI CLIP's `model.py` and keeps every parameter name, so OpenAI `.pt` archives and
official DenseCLIP checkpoints load strictly. CLIP's ResNet image encoder and its attention pool are in
resnet.py; reading OpenAI's `.pt` files (`load_clip`) is in checkpoint.py. What differs from OpenAI's code:
- Tensors are batch-first everywhere and attention runs through `F.scaled_dot_product_attention`
  (OpenAI permutes to (L, B, C) for `nn.MultiheadAttention`); no `.half()`: use `torch.autocast` (on CPU, short
  sequences then attend in fp32: `attention`).
- `VisionTransformer.forward_dense` also returns the four pyramid levels and the dense map z. The ViT pyramid
  (up x4, up x2, identity, down x2 from blocks 3, 5, 7, 11) is the one of the official DenseCLIP ViT-B/16
  backbone, with the same parameter names (fpn1..fpn4).
- `forward_dense(x, last_block=fn)` computes z with `fn(block, x, grid)` in place of the last block (its input x,
  its output tokens then through ln_post and proj as CLIP's): the training-free read-outs of readouts.py (MaskCLIP,
  SCLIP, ClearCLIP, NACLIP) plug in there; z̄ stays CLIP's pooled feature. Zero-shot segmentation uses it
  (zeroshot.py), with `pos_interpolation = "bicubic"`: the positional-grid resize of those papers' code (DINO's).
- `TextEncoder` accepts learnable context vectors inserted right after the start token (CoOp),
  and truncates its positional embedding to the sequence it is given. With contexts, the prompt prefix shared by
  all class names ([SOT, contexts]: causal, so its hidden states are the same for every name) runs once, and the
  names attend to its keys and values (same result, about 3x fewer token positions for 150 classes).

Shape letters: B batch, C channels, H W feature grid, N = H*W visual tokens, K classes (texts),
L text length, M learnable context tokens, D joint embedding dimension.
"""
import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics, for pixels scaled to [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def resize_pos_embed(pos: torch.Tensor, grid: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(1 + S*S, C) positional embedding -> (1 + H*W, C): the class/mean slot is kept, the square spatial grid is
    resized. mode "bilinear" (align_corners=False), as the official DenseCLIP code: at the stored size the resize is
    exactly the identity (it samples the stored cells themselves), so there is no branch for it and a traced graph
    (tools/export.py's ONNX file) serves every size. mode "bicubic": DINO's resize, which the SCLIP / ClearCLIP /
    NACLIP code use (scale factors (H + 0.1) / S and (W + 0.1) / S, so that flooring gives H x W; the stored grid is
    used as stored, since that resize is not the identity there)."""
    n, C = pos.shape
    S = math.isqrt(n - 1)
    assert S * S == n - 1, f"positional embedding of {n} rows is not 1 + a square grid"
    if mode == "bicubic" and tuple(grid) == (S, S):
        return pos
    spatial = pos[1:].reshape(1, S, S, C).permute(0, 3, 1, 2)  # (1, C, S, S)
    if mode == "bicubic":
        spatial = F.interpolate(spatial, scale_factor=((grid[0] + 0.1) / S, (grid[1] + 0.1) / S), mode="bicubic",
                                align_corners=False, recompute_scale_factor=False)
    else:
        spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
    spatial = spatial.flatten(2).transpose(1, 2)[0]  # (H*W, C)
    return torch.cat([pos[:1], spatial], dim=0)


# ----------------------------------------------------------------------------- transformers
# On CPU, the bf16 / fp16 kernels of scaled_dot_product_attention pay a fixed cost per (sequence, head) pair in the
# backward, ~60 us against ~9 us in fp32 (torch 2.14, one thread; bench/README.md): for the text encoder's short
# prompts (150 classes x 8 heads x 13 tokens) the bf16 forward + backward took 6x as long as fp32. Up to this many
# keys, reduced-precision attention on CPU runs in fp32 (faster there, and more exact); beyond it (ViT-B at 640:
# 1601 tokens) the bf16 kernel is the faster one. Set it to 0 for the kernel as autocast picks it.
CPU_FP32_ATTENTION_MAX_KEYS = 256


def attention(q, k, v, attn_mask=None, is_causal: bool = False):
    """F.scaled_dot_product_attention (q (..., Lq, d), k v (..., Lk, d)), in fp32 on CPU for reduced-precision
    inputs of at most CPU_FP32_ATTENTION_MAX_KEYS keys (the result is cast back to q's dtype)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and \
            k.shape[-2] <= CPU_FP32_ATTENTION_MAX_KEYS:
        with torch.autocast("cpu", enabled=False):  # autocast would cast fp32 inputs back to bf16
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               is_causal=is_causal)
        return x.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight, in_proj_bias, out_proj), batch-first,
    computed with `attention` (scaled_dot_product_attention)."""

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
        x = attention(q, k, v, is_causal=causal)  # (B, h, L, C/h)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))

    def forward_shared_prefix(self, x, G: int, P: int, K: int):
        """Causal attention of G prefixes of P tokens, each shared by K suffixes of S tokens, on the tokens laid out
        flat: x (G*P + G*K*S, C), the prefixes first. A prefix attends causally to itself (it sees no suffix); a
        suffix to its whole prefix and causally to itself: the plain causal attention of the G*K sequences
        [prefix; suffix], with each prefix's keys and values computed once instead of K times."""
        N, C = x.shape
        h, S = self.heads, (N - G * P) // (G * K)
        pre, suf = F.linear(x, self.in_proj_weight, self.in_proj_bias).split([G * P, G * K * S])  # (N, 3C) split
        q_p, k_p, v_p = pre.view(G, P, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (G, h, P, C/h)
        q_s, k_s, v_s = suf.view(G * K, S, 3, h, C // h).permute(2, 0, 3, 1, 4)  # 3 x (G*K, h, S, C/h)
        out_p = attention(q_p, k_p, v_p, is_causal=True)  # (G, h, P, C/h)
        k_s, v_s = (torch.cat([t[:, None].expand(G, K, h, P, C // h), u.unflatten(0, (G, K))], dim=3).flatten(0, 1)
                    for t, u in ((k_p, k_s), (v_p, v_s)))  # 2 x (G*K, h, P+S, C/h): the prefix's, then its own
        mask = torch.ones(S, P + S, dtype=torch.bool, device=x.device).tril(P)  # (S, P+S): suffix i sees j <= P+i
        out_s = attention(q_s, k_s, v_s, attn_mask=mask)  # (G*K, h, S, C/h)
        out = torch.cat([out_p.transpose(1, 2).reshape(G * P, C), out_s.transpose(1, 2).reshape(G * K * S, C)])
        return self.out_proj(out)  # (N, C)


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

    def forward_shared_prefix(self, x, G: int, P: int, K: int):
        """The block on the flat shared-prefix layout of SelfAttention.forward_shared_prefix, x (N, C). Only for
        blocks without drop path (CLIP's text encoder has none, nor dropout): drop path draws per sequence."""
        assert self.drop_path == 0.0 or not self.training, "drop path needs one sequence per row"
        x = x + self.attn.forward_shared_prefix(self.ln_1(x), G, P, K)
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
    `pos_interpolation`: how the positional grid is resized to other input sizes (resize_pos_embed).
    """

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: Optional[int], drop_path_rate: float = 0.0, out_indices: Sequence[int] = (3, 5, 7, 11),
                 pyramid: bool = False, add_class_embedding_twice: bool = False):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.out_indices = list(out_indices)
        self.add_class_embedding_twice = add_class_embedding_twice
        self.pos_interpolation = "bilinear"  # the official DenseCLIP's; "bicubic": the zero-shot papers' (DINO's)
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
        pos = resize_pos_embed(self.positional_embedding, (H, W), self.pos_interpolation).to(x.dtype)  # (1+N, C)
        if self.add_class_embedding_twice:
            pos = torch.cat([pos[:1] + self.class_embedding.to(x.dtype), pos[1:]], dim=0)
        return self.ln_pre(x + pos), (H, W)

    def forward_dense(self, x, last_block: Optional[Callable] = None):
        """-> ([x1..x4] or [], z̄ (B, D) or None, z (B, D, H, W) or None). z: the last block's patch tokens, or with
        `last_block` (a read-out of readouts.py) the patch tokens of last_block(block, x, (H, W)) run in its place;
        either way through ln_post and proj. z̄ and the pyramid are always CLIP's own."""
        x, (H, W) = self._tokens(x)
        B = x.shape[0]
        feats = []
        last = len(self.transformer.resblocks) - 1
        for i, block in enumerate(self.transformer.resblocks):
            if i == last and last_block is not None:
                readout = last_block(block, x, (H, W))  # (B, 1+N, C)
            x = block(x)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, -1, H, W))  # (B, C, H, W)
        if hasattr(self, "fpn1"):
            feats = [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]
        if not hasattr(self, "proj"):
            return feats, None, None
        x = self.ln_post(x) @ self.proj  # (B, 1+N, D)
        dense = x[:, 1:] if last_block is None else self.ln_post(readout[:, 1:]) @ self.proj  # (B, N, D)
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
    With contexts, the prefix [SOT, ctx_1..ctx_M] that all K names share runs once per context group
    (`_forward_shared_prefix`; `share_prefix = False` runs the plain path, G*K whole sequences, instead).
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
        self.share_prefix = True  # with contexts, run the shared prompt prefix once (False: the plain reference path)
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
        G, L = 1, text.shape[1] + (0 if contexts is None else contexts.shape[1])
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"text of {L} tokens does not fit the {self.positional_embedding.shape[0]} positions")
        if contexts is not None:
            # one start token for all names, and every EOT after it (always so for tokenized text)
            if self.share_prefix and bool(((text[:, 0] == text[0, 0]) & (eot > 0)).all()):
                return self._forward_shared_prefix(x, eot, contexts)
            G, M, C = contexts.shape
            x = x.unsqueeze(0).expand(G, -1, -1, -1)  # (G, K, L_t, C)
            ctx = contexts.to(x.dtype).unsqueeze(1).expand(-1, K, -1, -1)  # (G, K, M, C)
            x = torch.cat([x[:, :, :1], ctx, x[:, :, 1:]], dim=2).flatten(0, 1)  # (G*K, L, C)
            eot = (eot + M).repeat(G)  # (G*K,)
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.ln_final(self.transformer(x, causal=True))  # (G*K, L, C)
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (G*K, D)
        return x if contexts is None else x.view(G, K, -1)

    def _forward_shared_prefix(self, x, eot, contexts):
        """The forward with contexts, computing the shared prefix [SOT, ctx_1..ctx_M] once per context group.

        The encoder is causal, so the P = 1 + M prefix positions have the same hidden states for all K class
        names: they run as G sequences, and the K name suffixes attend to their prefix's keys and values
        (SelfAttention.forward_shared_prefix). The suffixes stop at the latest end-of-text token: positions after
        it reach no EOT output. G*P + G*K*S token positions instead of G*K*(P + L_t - 1); the same computation as
        the plain path up to float rounding (tests/test_prefix_sharing.py)."""
        K, G, M, C = x.shape[0], *contexts.shape
        P, S = 1 + M, int(eot.max())  # S: the name tokens up to the last EOT (x's positions 1..S)
        pos = self.positional_embedding[:P + S].to(x.dtype)  # (P+S, C)
        prefix = torch.cat([x[:1, :1].expand(G, 1, C), contexts.to(x.dtype)], dim=1) + pos[:P]  # (G, P, C)
        suffix = (x[:, 1:S + 1] + pos[P:]).expand(G, K, S, C)  # (G, K, S, C)
        x = torch.cat([prefix.reshape(G * P, C), suffix.reshape(G * K * S, C)])  # (G*P + G*K*S, C)
        for block in self.transformer.resblocks:
            x = block.forward_shared_prefix(x, G, P, K)
        x = x[G * P:].view(G, K, S, C)[:, torch.arange(K, device=x.device), eot - 1]  # (G, K, C): the EOT tokens
        return self.ln_final(x) @ self.text_projection  # (G, K, D)


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
