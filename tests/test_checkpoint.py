"""Checkpoint loading: official DenseCLIP (mmseg) files, OpenAI CLIP initialisation, ours, errors."""
import pytest
import torch

import official_keys
from denseclip.checkpoint import CheckpointError, load_checkpoint
from denseclip.data.classes import ADE20K_CLASSES
from denseclip import build_model
from denseclip.language import drop_text_encoder

from peers import openai_clip, tiny_openai_clip

NAMES = list(ADE20K_CLASSES)  # 150 classes, as the official ADE20K configs


def _random_state_dict(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked")
            else torch.randn(s, generator=g) for k, s in spec.items()}


@pytest.mark.parametrize("name", ["denseclip_r50", "fpn_clip_r50", "denseclip_vitb16"])
def test_official_checkpoint_loads_strictly(name, tmp_path):
    sd = _random_state_dict(getattr(official_keys, name)())
    path = tmp_path / "official.pth"
    torch.save({"meta": {"mmseg_version": "0.19.0"}, "state_dict": sd}, path)
    model = build_model(name, NAMES)
    report = load_checkpoint(model, str(path))
    assert report.kind == "model" and not report.missing and not report.unused
    assert len(report.loaded) == len(sd)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())


def test_official_checkpoint_mismatch_names_the_keys(tmp_path):
    sd = _random_state_dict(official_keys.fpn_clip_r50())
    del sd["decode_head.conv_seg.bias"]
    sd["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decode_head\.conv_seg\.bias.*decode_head\.extra\.weight"):
        load_checkpoint(build_model("fpn_clip_r50", NAMES), sd)
    sd = _random_state_dict(official_keys.fpn_clip_r50(K=19))  # a Cityscapes head on an ADE20K model
    with pytest.raises(CheckpointError, match=r"conv_seg\.weight: file \(19, 256, 1, 1\) vs model \(150, 256, 1, 1\)"):
        load_checkpoint(build_model("fpn_clip_r50", NAMES), sd)


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    a, b = build_model("denseclip_tiny", NAMES[:4]), build_model("denseclip_tiny", NAMES[:4])
    torch.save({"model": a.state_dict(), "iteration": 3}, tmp_path / "ours.pth")
    load_checkpoint(b, str(tmp_path / "ours.pth"))
    x = torch.randn(1, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_model_without_text_encoder_exports_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", NAMES[:4]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        n_before = sum(p.numel() for p in model.parameters())
        drop_text_encoder(model)
        assert not hasattr(model, "text_encoder") and sum(p.numel() for p in model.parameters()) < n_before
        assert torch.equal(model(x), before)
    torch.save({"model": model.state_dict()}, tmp_path / "deploy.pth")
    fresh = build_model("denseclip_tiny", NAMES[:4]).eval()
    load_checkpoint(fresh, str(tmp_path / "deploy.pth"))
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


@pytest.mark.parametrize("name", ["denseclip_tiny", "fpn_tiny"])
def test_openai_clip_initialises_the_encoders(name, tmp_path):
    torch.manual_seed(0)
    clip_model = tiny_openai_clip()
    path = tmp_path / "RN-tiny.pt"
    example = (torch.randn(1, 3, 64, 64), openai_clip.tokenize(["a"]))
    torch.jit.trace(clip_model, example, check_trace=False).save(str(path))
    model = build_model(name, ["wall", "sky", "chest of drawers"])
    report = load_checkpoint(model, str(path))
    assert report.kind == "clip"
    clip_sd = clip_model.state_dict()
    assert torch.equal(model.backbone.conv1.weight, clip_sd["visual.conv1.weight"])
    assert all(k.startswith(("neck.", "decode_head.", "context_decoder.", "contexts", "gamma")) for k in report.missing)
    if name == "fpn_tiny":  # no attention pool, no text in the plain-FPN baseline: reported, not silently dropped
        assert "visual.attnpool.c_proj.weight" in report.unused and "token_embedding.weight" in report.unused
        return
    assert report.unused == ["logit_scale"]
    # attention-pool grid resized 2x2 -> 4x4; text positions truncated 77 -> 13
    assert model.backbone.attnpool.positional_embedding.shape == (17, 512)
    assert torch.equal(model.text_encoder.positional_embedding, clip_sd["positional_embedding"][:13])
    with torch.no_grad():  # the frozen text encoder is CLIP's: same features for the bare class prompts
        ours = model.text_encoder(model.texts)
        ref = clip_model.encode_text(openai_clip.tokenize(["wall", "sky", "chest of drawers"]))
        assert torch.allclose(ours, ref, atol=1e-5)


def test_clip_file_of_another_architecture_is_an_error():
    sd = tiny_openai_clip().state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(build_model("denseclip_tiny", ["wall"], embed_dim=32), sd)


def test_imagenet_resnet_initialises_any_backbone():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    model = build_model("denseclip_imagenet_r50", ["wall", "sky"], text_layers=1)
    report = load_checkpoint(model, net.state_dict())
    assert report.kind == "imagenet" and report.unused == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    assert any(".attnpool." in k for k in report.missing)
    with pytest.raises(CheckpointError, match="only initialises"):
        load_checkpoint(build_model("denseclip_tiny", ["wall"]), net.state_dict())
