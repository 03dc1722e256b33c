"""Segmentor: shapes at two sizes, losses, text-feature caching, freezing, inference modes, overfitting."""
import pytest
import torch
import torch.nn.functional as F

from denseclip import build_model, language
from denseclip.inference import slide_inference
from denseclip.segmentor import seg_cross_entropy

NAMES = ["background", "circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("denseclip_tiny", NAMES)


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
@pytest.mark.parametrize("prompting", ["post", "pre", "none"])
def test_shapes_and_losses(size, prompting):
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", NAMES, prompting=prompting)
    x, y = torch.randn(2, 3, *size), torch.randint(0, 4, (2, *size))
    model.train()
    losses = model(x, y)
    assert set(losses) == {"loss_decode", "loss_aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    seen = {}  # the head's logits and the score map concatenated to x4, inside one forward
    hooks = [model.decode_head.register_forward_hook(lambda m, args, out: seen.update(logits=out)),
             model.neck.register_forward_pre_hook(lambda m, args: seen.update(score=args[0][3][:, -4:]))]
    with torch.no_grad():
        assert model(x).shape == (2, 4, *size)
        _, zg, zd = model.backbone.forward_dense(x)
        score = language.score_map(zd, language.context_aware_text(model, zg, zd))
    for hook in hooks:
        hook.remove()
    assert seen["logits"].shape == (2, 4, size[0] // 4, size[1] // 4)
    assert score.shape == (2, 4, size[0] // 32, size[1] // 32) and torch.equal(seen["score"], score)


def test_baseline_has_no_language():
    model = build_model("fpn_tiny", NAMES)
    assert not hasattr(model, "text_encoder") and not hasattr(model, "contexts")
    assert set(model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))) == {"loss_decode"}


@pytest.mark.parametrize("freeze, table", [(True, False), (False, True), (False, False)])
def test_what_of_the_text_encoder_learns(freeze, table):
    """Frozen (the official recipe): only the contexts learn through it; unfrozen: all of it, or all but the BPE
    table (freeze_token_embedding, the tiny recipes'); the contexts and γ learn in every case."""
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", NAMES, freeze_text_encoder=freeze, freeze_token_embedding=table).train()
    sum(model(torch.randn(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64))).values()).backward()
    params = dict(model.text_encoder.named_parameters())
    want = set() if freeze else set(params) - ({"token_embedding.weight"} if table else set())
    assert {n for n, p in params.items() if p.requires_grad} == want
    assert {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0} == want
    assert model.contexts.grad is not None and model.contexts.grad.abs().sum() > 0
    assert model.gamma.grad is not None


def test_text_features_cached_in_eval_only(tiny):
    calls = []
    hook = tiny.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 64, 64)
    tiny.eval()
    with torch.no_grad():
        first = tiny(x)
        second = tiny(x)
    assert len(calls) == 1 and torch.equal(first, second)
    tiny.train()  # training invalidates the cache and recomputes every step
    tiny(x, torch.zeros(2, 64, 64, dtype=torch.long))
    tiny(x, torch.zeros(2, 64, 64, dtype=torch.long))
    assert len(calls) == 3
    hook.remove()


def official_score_map(z_dense, text):
    """The official score map (DenseCLIP.compute_score_map's einsum, as a broadcast sum here): cosines of the
    L2-normalised z (B, D, h, w) and t (B, K, D) -> (B, K, h, w)."""
    return (F.normalize(z_dense, dim=1)[:, None] * F.normalize(text, dim=2)[..., None, None]).sum(2)


def mmseg_cross_entropy(logits, labels, ignore_index=255):
    """mmseg 0.19's CrossEntropyLoss on (B, K, H, W) logits, written out: the per-pixel NLL, ignored pixels counting
    zero, averaged over all B x H x W pixels."""
    nll = -logits.log_softmax(1).gather(1, labels.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]  # (B, H, W)
    return (nll * (labels != ignore_index)).sum() / labels.numel()


def test_gamma_and_score_map_definition(tiny):
    """s = <z/|z|, t/|t|> with t = t0 + γ·Δt, computed by hand from the parts."""
    tiny.eval()
    with torch.no_grad():
        feats, zg, zd = tiny.backbone.forward_dense(torch.randn(2, 3, 64, 64))
        t0 = tiny.text_encoder(tiny.texts, tiny.contexts).expand(2, -1, -1)
        visual = torch.cat([zg[:, None], zd.flatten(2).transpose(1, 2)], 1)
        t = t0 + tiny.gamma * tiny.context_decoder(t0, visual)
        ref = official_score_map(zd, t)
        assert torch.allclose(language.score_map(zd, language.context_aware_text(tiny, zg, zd)), ref, atol=1e-5)
    assert torch.allclose(tiny.gamma, torch.full_like(tiny.gamma, 1e-4))


def test_long_class_name_is_a_clear_error():
    with pytest.raises(ValueError, match="swimming pool with diving board"):
        build_model("denseclip_tiny", ["wall", "swimming pool with diving board"])
    model = build_model("denseclip_tiny", ["wall", "swimming pool with diving board"], truncate_class_names=True)
    assert model.texts.shape == (2, 5)
    longer = build_model("denseclip_tiny", ["swimming pool with diving board"], class_token_length=9)
    assert longer.texts.shape == (1, 9)


def test_class_embedding_quirk_only_in_official_vit_configs():
    from denseclip.configs import CONFIGS, DenseCLIPConfig

    assert all(CONFIGS[n]().add_class_embedding_twice for n in ("denseclip_vitb16", "fpn_clip_vitb16"))
    assert not DenseCLIPConfig().add_class_embedding_twice  # new configs train without it
    model = build_model("denseclip_vitb16", NAMES, vision_layers=1, text_layers=1)
    assert model.backbone.add_class_embedding_twice


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError):
        build_model("denseclip_tiny", NAMES, contxt_length=16)
    with pytest.raises(ValueError, match="unknown config"):
        build_model("denseclip_r51", NAMES)


def test_loss_averages_over_all_pixels_like_mmseg():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    labels[0, 0] = 255
    assert torch.allclose(seg_cross_entropy(logits, labels, 255), mmseg_cross_entropy(logits, labels))


def test_slide_equals_whole_when_crop_covers_image(tiny):
    tiny.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        whole = tiny(x)
        assert torch.allclose(slide_inference(tiny, x, crop=128, stride=85), whole, atol=1e-5)
        # overlapping windows: every pixel covered, output is the per-pixel mean of the windows
        slid = slide_inference(tiny, x, crop=64, stride=32)
        left, right = tiny(x[..., :64]), tiny(x[..., 32:])
        assert torch.allclose(slid[..., 40:56], (left[..., 40:56] + right[..., 8:24]) / 2, atol=1e-5)


def test_aug_single_scale_no_flip_equals_single_scale(tiny):
    tiny.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        single = tiny(x).softmax(1)
        assert torch.allclose(tiny.predict(x, mode="whole"), single, atol=1e-6)
        flipped = tiny.predict(x, ratios=(1.0,), flip=True, mode="whole")
        expected = (single + tiny(x.flip(-1)).softmax(1).flip(-1)) / 2
        assert torch.allclose(flipped, expected, atol=1e-6)
        assert tiny.predict(x, out_size=(50, 70), ratios=(0.5, 1.5), mode="whole").shape == (1, 4, 50, 70)


def _blobs(n=4, size=64, seed=0):
    """Images whose class is the shape of a bright patch: square (1) vs disc (2) on noise (0)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = torch.randn(n, 3, size, size, generator=g) * 0.3, torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cy, cx = torch.randint(16, size - 16, (2,), generator=g).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2
        square = ((yy - cy).abs() < 11) & ((xx - cx).abs() < 11)
        mask, k = (disc, 2) if i % 2 else (square, 1)
        images[i][:, mask] += torch.rand(3, 1, generator=g) * 2
        labels[i][mask] = k
    return images, labels


def test_tiny_config_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", ["background", "square", "circle"], head_dropout=0.0, decoder_dropout=0.0)
    images, labels = _blobs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    start = None
    for _ in range(60):
        loss = sum(model(images, labels).values())
        start = start if start is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * start, (start, loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean()
    assert acc > 0.9
