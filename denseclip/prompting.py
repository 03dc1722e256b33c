"""Context-aware prompting (DenseCLIP Sec. 3.3, vision-to-language prompting): a small transformer decoder that lets
text features attend to the visual context [z̄; z].

- Post-model prompting (the default): `ContextDecoder(t, [z̄; z])` gives Δt, and the text features are updated as
  t <- t + γ·Δt, γ a learnable per-channel scale initialised to 1e-4 (language.py does the update).
- Pre-model prompting (the paper's ablation, not in the official release): `PreModelPrompter` turns learnable
  queries into per-image prompt vectors by attending to the visual context; they are fed to the text encoder in
  place of the learnable contexts of language-domain prompting.

Mirrors the official `ContextDecoder` / `TransformerDecoderLayer` / `Attention` (models.py) and
keeps their parameter names so official checkpoints load. Matching the official code on purpose:
q/k/v projections without bias, exact GELU (not CLIP's QuickGELU), dropout only after the output
projections and in the MLP, memory projected with a trailing LayerNorm and not normalised again
inside the layers, truncated-normal(0.02) init of every Linear. Batch-first; attention through
`F.scaled_dot_product_attention`. Imports only torch. Shape letters: B batch, K texts, N visual tokens, C width.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of queries (B, K, C) over keys/values (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q, k, v):
        B, K, C = q.shape
        h = self.num_heads
        q = self.q_proj(q).view(B, K, h, C // h).transpose(1, 2)  # (B, h, K, C/h)
        k = self.k_proj(k).view(B, -1, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        v = self.v_proj(v).view(B, -1, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, K, C)  # (B, K, C)
        return self.proj_drop(self.proj(x))


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention, cross-attention to the memory, MLP."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, proj_drop=dropout)
        self.cross_attn = Attention(d_model, nhead, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model * 4), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_model * 4, d_model))

    def forward(self, x, mem):
        q = self.norm1(x)
        x = x + self.self_attn(q, q, q)
        x = x + self.cross_attn(self.norm2(x), mem, mem)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """forward(text (B, K, text_dim), visual (B, N, visual_dim)) -> (B, K, text_dim).

    Text and visual tokens are projected to a narrow width (256 in the official configs), decoded,
    and projected back. text_dim defaults to visual_dim (post-model: t and z share the joint space).
    """

    def __init__(self, visual_dim: int, transformer_width: int = 256, transformer_heads: int = 4,
                 transformer_layers: int = 3, dropout: float = 0.1, text_dim: int = None):
        super().__init__()
        text_dim = text_dim or visual_dim
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, transformer_width),
                                         nn.LayerNorm(transformer_width))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, transformer_width))
        self.decoder = nn.ModuleList([TransformerDecoderLayer(transformer_width, transformer_heads, dropout)
                                      for _ in range(transformer_layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(transformer_width), nn.Linear(transformer_width, text_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, text, visual):
        mem = self.memory_proj(visual)  # (B, N, width)
        x = self.text_proj(text)  # (B, K, width)
        for layer in self.decoder:
            x = layer(x, mem)
        return self.out_proj(x)  # (B, K, text_dim)


class PreModelPrompter(nn.Module):
    """Pre-model prompting: M learnable queries attend to [z̄; z] and become the per-image prompt.

    forward(visual (B, N, visual_dim)) -> contexts (B, M, token_dim), to be inserted after the
    start token of every class prompt by the text encoder (so the text encoder runs per image).
    """

    def __init__(self, num_queries: int, token_dim: int, visual_dim: int, transformer_width: int = 256,
                 transformer_heads: int = 4, transformer_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        # initialised like the post-model contexts (truncated normal, std 1, as the official code)
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_queries, token_dim)))
        self.decoder = ContextDecoder(visual_dim, transformer_width, transformer_heads, transformer_layers,
                                      dropout, text_dim=token_dim)

    def forward(self, visual):
        return self.decoder(self.queries.expand(visual.shape[0], -1, -1), visual)  # (B, M, token_dim)
