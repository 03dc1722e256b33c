"""Context decoder: equal to the official formulation (einsum attention, written out here) on shared weights."""
import torch
import torch.nn.functional as F

from denseclip.prompting import ContextDecoder, PreModelPrompter


def _official_attention(attn, q, k, v):
    """The official Attention.forward: per-head einsum, softmax over keys, no q/k/v bias."""
    B, N, C = q.shape
    M, h = k.shape[1], attn.num_heads
    q = F.linear(q, attn.q_proj.weight).reshape(B, N, h, C // h)
    k = F.linear(k, attn.k_proj.weight).reshape(B, M, h, C // h)
    v = F.linear(v, attn.v_proj.weight).reshape(B, M, h, C // h)
    w = (torch.einsum("bnkc,bmkc->bknm", q, k) * (C // h) ** -0.5).softmax(dim=-1)
    return attn.proj(torch.einsum("bknm,bmkc->bnkc", w, v).reshape(B, N, C))


def _official_decoder(dec, text, visual):
    mem = dec.memory_proj(visual)
    x = dec.text_proj(text)
    for layer in dec.decoder:
        q = layer.norm1(x)
        x = x + _official_attention(layer.self_attn, q, q, q)
        x = x + _official_attention(layer.cross_attn, layer.norm2(x), mem, mem)
        x = x + layer.mlp(layer.norm3(x))
    return dec.out_proj(x)


def test_context_decoder_matches_official_formulation():
    torch.manual_seed(0)
    dec = ContextDecoder(visual_dim=64, transformer_width=32, transformer_heads=4, transformer_layers=3).eval()
    for p in dec.parameters():  # move away from the init (zero biases, unit norms) so every term matters
        p.data.add_(torch.randn_like(p) * 0.1)
    text, visual = torch.randn(2, 5, 64), torch.randn(2, 1 + 12, 64)
    with torch.no_grad():
        assert torch.allclose(dec(text, visual), _official_decoder(dec, text, visual), atol=1e-5)


def test_context_decoder_official_details():
    dec = ContextDecoder(visual_dim=64, transformer_width=32, transformer_heads=4, transformer_layers=2)
    layer = dec.decoder[0]
    assert layer.self_attn.q_proj.bias is None and layer.cross_attn.v_proj.bias is None  # qkv_bias=False
    assert isinstance(layer.mlp[1], torch.nn.GELU) and layer.mlp[1].approximate == "none"  # exact GELU
    assert isinstance(dec.memory_proj[2], torch.nn.LayerNorm)  # memory ends normalised
    assert all(m.bias.abs().sum() == 0 for m in dec.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    w = dec.text_proj[1].weight
    # timm's trunc_normal_(std=0.02) as the official code: bounds are ±2 absolute, so practically untruncated
    assert 0.018 < w.std() < 0.022 and w.abs().max() > 0.04


def test_dropout_only_in_training():
    torch.manual_seed(0)
    dec = ContextDecoder(visual_dim=16, transformer_width=16, transformer_heads=2, transformer_layers=1, dropout=0.5)
    text, visual = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    dec.eval()
    assert torch.equal(dec(text, visual), dec(text, visual))
    dec.train()
    assert not torch.equal(dec(text, visual), dec(text, visual))


def test_pre_model_prompter_shapes_depend_on_image():
    torch.manual_seed(0)
    prompter = PreModelPrompter(num_queries=8, token_dim=24, visual_dim=16, transformer_width=16,
                                transformer_heads=2, transformer_layers=1).eval()
    visual = torch.randn(3, 10, 16)
    with torch.no_grad():
        ctx = prompter(visual)
    assert ctx.shape == (3, 8, 24)
    assert not torch.allclose(ctx[0], ctx[1])  # per-image prompts
