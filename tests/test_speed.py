"""Training speed features: the text encoder once per optimiser step (same gradients as once per micro-batch, one
process and two DDP processes, with a GradScaler's scaling), and what stays fp32 under bf16 autocast."""
import contextlib
import json

import pytest
import torch

from denseclip.data.procedural import SHAPE_CLASSES
from denseclip import build_model, language
from test_train import torchrun

NO_DROPOUT = dict(head_dropout=0.0, decoder_dropout=0.0)


def rel_diff(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def accumulated_grads(model, batches, text_once: bool, scale: float = 1.0):
    """Gradients of one optimiser step over `batches` (micro-batches), and the number of text-encoder forwards."""
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    with language.text_once_per_step(model) if text_once else contextlib.nullcontext():
        for images, labels in batches:
            (sum(model(images, labels).values()) * scale / len(batches)).backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def micro_batches(n=4, batch=1, size=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=gen).to(dtype),
             torch.randint(0, len(SHAPE_CLASSES), (batch, size, size), generator=gen)) for _ in range(n)]


# The shipped set-up (frozen text encoder) in fp32. With a trainable text encoder its LayerNorm gradients sit at
# ~1e-6 relative fp32 rounding (summing before vs after the backward), so that case runs in float64.
@pytest.mark.parametrize("freeze, dtype", [(True, torch.float32), (False, torch.float64)])
def test_text_once_per_step_gives_per_micro_batch_gradients(freeze, dtype):
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, freeze_text_encoder=freeze, **NO_DROPOUT).train().to(dtype)
    batches = micro_batches(n=4 if dtype == torch.float32 else 2, dtype=dtype)
    ref, calls_ref = accumulated_grads(model, batches, text_once=False)
    once, calls_once = accumulated_grads(model, batches, text_once=True)
    assert (calls_ref, calls_once) == (len(batches), 1)
    assert set(ref) == set(once) and "contexts" in ref
    assert any(n.startswith("text_encoder.") for n in ref) == (not freeze)
    for name, g in ref.items():
        assert rel_diff(once[name], g) < 1e-6, name
    # A GradScaler multiplies the loss: the leaf gradients carry the scale into the text backward unchanged.
    scaled, _ = accumulated_grads(model, batches, text_once=True, scale=1024.0)
    for name, g in ref.items():
        assert rel_diff(scaled[name] / 1024.0, g) < 1e-6, name
    # Outside the context and in evaluation nothing changed: per-call text, cached in eval.
    assert model.text_cache.step is None


def test_pre_model_prompting_keeps_one_text_pass_per_micro_batch():
    """Per-image prompts: the text depends on each image, so the context leaves every forward as it was."""
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, prompting="pre", **NO_DROPOUT).train()
    assert language.text_once_parameters(model) == []
    calls = []
    model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    images, labels = micro_batches(n=1)[0]
    with language.text_once_per_step(model):
        assert model.text_cache.step is None
        with torch.no_grad():
            model(images, labels)
            model(images, labels)
    assert len(calls) == 2


def test_text_once_per_step_under_ddp_matches_ddp_per_micro_batch(tmp_path):
    """2 gloo processes x 2 micro-batches: the text parameters leave DDP's reducer and are averaged by
    text_once_per_step; every gradient equals DDP's own per-micro-batch result, on both ranks; and those of the
    shared prompt prefix (the default) equal the text encoder's plain path under the same DDP step (fp32)."""
    torchrun("tests/ddp_text_once.py", [str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["missing"] == [] and "contexts" in out["rel"] and set(out["rel_plain"]) == set(out["rel"])
    assert max(out["rel"].values()) < 1e-6, max(out["rel"].items(), key=lambda kv: kv[1])
    # the attention pool's key bias shifts every logit of a query alike, so softmax removes it: its true gradient is
    # 0 and what is computed is rounding noise, relative to which any two computations differ by ~100%
    plain = {n: r for n, r in out["rel_plain"].items() if n != "backbone.attnpool.k_proj.bias"}
    # fp32: the two paths sum in different orders (float64 agreement to 1e-12 is in tests/test_prefix_sharing.py);
    # the context decoder's gradients, scaled by gamma = 1e-4, show it most (~2e-5)
    assert max(plain.values()) < 1e-4, max(plain.items(), key=lambda kv: kv[1])
    assert out["contexts_rank_diff"] == 0.0 and out["contexts_norm"] > 0  # averaged: the same on both ranks


def test_bf16_autocast_keeps_losses_bn_statistics_and_score_map_in_fp32():
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, **NO_DROPOUT).train()
    images, labels = micro_batches(n=1)[0]
    bn = model.decode_head.scale_heads[0][0].bn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, z_global, z_dense = model.backbone.forward_dense(images)
        assert z_dense.dtype == torch.bfloat16  # the image encoder does run in bf16
        score = language.score_map(z_dense, language.context_aware_text(model, z_global, z_dense))
        losses = model(images, labels)
    assert score.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    # The score map's cosines are fp32 computations of the (bf16-rounded) features: |s| <= 1 holds to fp32 precision.
    assert score.abs().max() <= 1 + 1e-6
    # BatchNorm statistics are accumulated in fp32 from the bf16 input: equal to fp32 statistics of that input.
    x = torch.randn(4, 8, 16, 16).bfloat16()
    m = torch.nn.BatchNorm2d(8, momentum=1.0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    assert torch.allclose(m.running_mean, x.float().mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.running_var, x.float().var((0, 2, 3)), rtol=1e-4)


def test_checkpoint_activations_same_gradients_and_bn_statistics():
    from denseclip.run.activation_checkpoint import checkpoint_activations
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model("denseclip_tiny", SHAPE_CLASSES).train()  # dropout on: checkpoint replays the RNG
        if ckpt:
            assert checkpoint_activations(model) == 4  # the tiny ResNet's four Bottlenecks, not the text encoder
        images, labels = micro_batches(n=1)[0]
        torch.manual_seed(1)
        sum(model(images, labels).values()).backward()
        results.append(({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model.state_dict()))
    (g0, s0), (g1, s1) = results
    assert set(g0) == set(g1) and s0.keys() == s1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-7), name
    for name in s0:  # running statistics updated once (num_batches_tracked 1), as without checkpointing
        assert torch.allclose(s0[name].float(), s1[name].float(), rtol=1e-6, atol=1e-7), name
