"""Prefix sharing in the causal text encoder: with contexts, [SOT, ctx_1..ctx_M] runs once per context group and the
class names attend to its keys and values. It must be the plain path's computation (features and gradients), in
float64 to 1e-12, under bf16 autocast, with pre-model prompting (one prefix per image) and with text once per step."""
import pytest
import torch

from denseclip import build_model, clip, language
from denseclip.clip import TextEncoder
from denseclip.data.classes import ADE20K_CLASSES
from denseclip.data.procedural import SHAPE_CLASSES
from test_speed import NO_DROPOUT, accumulated_grads, micro_batches, rel_diff

# ADE20K names of 1, 2 and 3 BPE tokens (EOT at 2, 3, 4 of the 5 class tokens)
MIXED = ["chest of drawers", "wall", "pool table"]
NAMES = {1: MIXED[:1], 3: MIXED, 150: list(ADE20K_CLASSES)}
TINY = dict(width=128, heads=2, layers=2, embed_dim=64)  # denseclip_tiny's text encoder
M = 8  # learnable contexts: 8 + 5 class tokens = 13 positions, as the official configs


def encoder(dtype=torch.float64, **sizes):
    torch.manual_seed(0)
    return TextEncoder(context_length=5 + M, **{**TINY, **sizes}).to(dtype)


def run(enc, names, contexts, share: bool, weights: bool):
    """Features (G, K, D) and the gradients of a fixed random-weighted sum of them to the contexts and (weights)
    to every text-encoder parameter."""
    enc.share_prefix = share
    ctx = contexts.detach().requires_grad_()
    out = enc(language.tokenize_class_names(names, 5, False), ctx)  # (G, K, D)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    params = [ctx, *enc.parameters()] if weights else [ctx]
    return out, torch.autograd.grad((out * w).sum(), params)


def assert_same(enc, names, contexts, tol, weights=True):
    shared, g_shared = run(enc, names, contexts, True, weights)
    plain, g_plain = run(enc, names, contexts, False, weights)
    assert shared.shape == plain.shape == (contexts.shape[0], len(names), enc.text_projection.shape[1])
    errors = [rel_diff(shared.double(), plain.double())] + [rel_diff(a.double(), b.double())
                                                              for a, b in zip(g_shared, g_plain)]
    assert max(errors) < tol, errors
    return max(errors)


@pytest.mark.parametrize("K", [1, 3, 150])
@pytest.mark.parametrize("G", [1, 3])  # 1: post-model (one prefix); 3: pre-model, one prefix per image
def test_shared_prefix_equals_plain_path_in_float64(K, G):
    enc = encoder()
    assert_same(enc, NAMES[K], torch.randn(G, M, 128, dtype=torch.float64), 1e-12)


def test_shared_prefix_at_the_official_text_encoder_size():
    """Width 512, 8 heads, 12 layers (RN50's embed 1024); the gradient to the contexts only (the dense token
    embedding gradient alone would be 49408 x 512 float64)."""
    enc = encoder(width=512, heads=8, layers=12, embed_dim=1024)
    assert_same(enc, MIXED, torch.randn(1, M, 512, dtype=torch.float64), 1e-12, weights=False)


@pytest.mark.parametrize("G", [1, 3])
def test_shared_prefix_under_bf16_autocast(G):
    """float32 weights under bf16 autocast, against the plain path under the same autocast."""
    enc = encoder(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(enc, NAMES[150], torch.randn(G, M, 128), 2e-2)


def test_every_class_sees_the_prefix_and_only_its_own_name():
    """The mutation check: a suffix that could not attend to the prefix would ignore the contexts. Changing the
    last context (the one next to the names) changes every class's feature; changing one name changes only its
    own feature."""
    enc = encoder()
    enc.share_prefix = True
    names = NAMES[150]
    ctx = torch.randn(1, M, 128, dtype=torch.float64)
    with torch.no_grad():
        base = enc(language.tokenize_class_names(names, 5, False), ctx)[0]  # (K, D)
        for i in (0, M - 1):  # the first context (right after SOT) and the last
            moved = ctx.clone()
            moved[0, i] += 0.1 * torch.randn(128, dtype=torch.float64)  # not a constant: LayerNorm removes those
            changed = (enc(language.tokenize_class_names(names, 5, False), moved)[0] - base).norm(dim=-1)  # (K,)
            assert (changed > 1e-6 * base.norm(dim=-1)).all(), i
        renamed = enc(language.tokenize_class_names(["door", *names[1:]], 5, False), ctx)[0]
    changed = (renamed - base).norm(dim=-1) / base.norm(dim=-1)  # (K,)
    assert changed[0] > 1e-3 and (changed[1:] < 1e-12).all()


def test_pre_model_segmentor_shares_a_prefix_per_image():
    """The whole pre-model segmentor (contexts from each image): losses and gradients as with the plain path."""
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, prompting="pre", **NO_DROPOUT).train().double()
    images, labels = micro_batches(n=1, batch=2, size=32, dtype=torch.float64)[0]
    results = []
    for share in (True, False):
        model.text_encoder.share_prefix = share
        model.zero_grad(set_to_none=True)
        loss = sum(model(images, labels).values())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_shared, g_shared), (l_plain, g_plain) = results
    results_g = (g_shared, g_plain)
    assert rel_diff(l_shared, l_plain) < 1e-12
    assert set(g_shared) == set(g_plain) and any(n.startswith("prompter.") for n in g_plain)
    # as one vector: some gradients are zero but for rounding (attnpool.k_proj.bias: softmax ignores a key bias)
    for keep in (lambda n: True, lambda n: n.startswith("prompter.")):
        flat_shared, flat_plain = (torch.cat([g[n].flatten() for n in sorted(g) if keep(n)]) for g in results_g)
        assert rel_diff(flat_shared, flat_plain) < 1e-12


def test_text_once_per_step_with_shared_prefix_gives_the_plain_per_micro_batch_gradients():
    """In float64: in fp32 summing before vs after the text backward alone differs by ~1e-6 (tests/test_speed.py)."""
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, **NO_DROPOUT).train().double()
    batches = micro_batches(n=2, dtype=torch.float64)
    model.text_encoder.share_prefix = False
    ref, _ = accumulated_grads(model, batches, text_once=False)
    model.text_encoder.share_prefix = True
    once, calls = accumulated_grads(model, batches, text_once=True)
    assert calls == 1 and set(once) == set(ref) and "contexts" in ref
    assert rel_diff(once["contexts"], ref["contexts"]) < 1e-12
    # the rest as one vector: some gradients are zero but for rounding (attnpool.k_proj.bias: softmax ignores a key
    # bias), and their relative difference is that of two rounding noises
    flat_once, flat_ref = (torch.cat([g[n].flatten() for n in sorted(ref)]) for g in (once, ref))
    assert rel_diff(flat_once, flat_ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_attention_runs_in_fp32_on_cpu_under_autocast(dtype):
    """clip.attention: on CPU, reduced-precision q, k, v of at most CPU_FP32_ATTENTION_MAX_KEYS keys go through the
    fp32 kernel (autocast would recast them: it is switched off inside), the result and the gradients in the
    inputs' dtype; longer sequences and CPU_FP32_ATTENTION_MAX_KEYS = 0 keep the reduced-precision kernel."""
    from torch.nn import functional as F
    g = torch.Generator().manual_seed(0)
    limit = clip.CPU_FP32_ATTENTION_MAX_KEYS
    for L, fp32 in ((13, True), (limit, True), (limit + 1, False)):
        q, k, v = (torch.randn(3, 2, L, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        with torch.autocast("cpu", dtype=dtype):
            out = clip.attention(q, k, v, attn_mask=mask)
        ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=mask).to(dtype) if fp32 \
            else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert out.dtype == dtype and torch.equal(out, ref), L
        out.float().sum().backward()
        assert q.grad.dtype == dtype and torch.isfinite(q.grad).all()
    q = torch.randn(3, 2, 13, 8, generator=g).to(dtype)
    try:
        clip.CPU_FP32_ATTENTION_MAX_KEYS = 0
        assert torch.equal(clip.attention(q, q, q, is_causal=True),
                           F.scaled_dot_product_attention(q, q, q, is_causal=True))
    finally:
        clip.CPU_FP32_ATTENTION_MAX_KEYS = limit
