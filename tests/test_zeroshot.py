"""Zero-shot segmentation from raw CLIP weights: MaskCLIP's dense read-out against a direct computation from the
OpenAI model's weights (ResNet and ViT), OpenAI's prompt ensembling, and `eval.py --zero-shot` through the same
mIoU code."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from peers import openai_clip, tiny_openai_clip

from denseclip.checkpoint import load_clip
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES
from denseclip.run.metrics import ConfusionMatrix
from denseclip.zeroshot import IMAGENET_TEMPLATES, ZeroShotConfig, ZeroShotSegmenter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402


def tiny_openai_vit():
    return openai_clip.model.CLIP(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64,
                                  vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=128,
                                  transformer_heads=2, transformer_layers=1).float().eval()


@pytest.fixture(scope="module")
def peer():
    torch.manual_seed(0)
    return tiny_openai_clip()


def test_templates_are_openais_80():
    assert IMAGENET_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


@pytest.mark.parametrize("size", [64, 96])
def test_maskclip_resnet_readout_is_value_then_output_projection(peer, size):
    torch.manual_seed(0)
    ours = load_clip(peer.state_dict()).visual
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        x4 = ours.forward_pyramid(image)[-1]  # (B, C, h, w): the trunk's parity is tested in test_clip.py
        pool = peer.visual.attnpool  # OpenAI's weights, applied position by position
        v = torch.einsum("oc,bchw->bohw", pool.v_proj.weight, x4) + pool.v_proj.bias[:, None, None]
        direct = torch.einsum("dc,bchw->bdhw", pool.c_proj.weight, v) + pool.c_proj.bias[:, None, None]
        feats, z_global, z_dense = ours.forward_dense(image, readout="maskclip")
        _, z_global_dc, z_dense_dc = ours.forward_dense(image)
    assert z_dense.shape == (2, 64, size // 32, size // 32)
    assert torch.allclose(z_dense, direct, atol=1e-5)
    assert torch.equal(z_global, z_global_dc)  # z̄ is CLIP's pooled feature with either read-out
    assert not torch.allclose(z_dense, z_dense_dc, atol=1e-3)  # the two read-outs differ


def test_maskclip_vit_readout_is_the_value_path_of_the_last_block():
    torch.manual_seed(0)
    peer = tiny_openai_vit()
    ours = load_clip(peer.state_dict()).visual
    image = torch.randn(2, 3, 64, 64)
    v = peer.visual
    with torch.no_grad():  # OpenAI's ViT up to the last block, then the value path written out from its weights
        x = v.conv1(image).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer.resblocks[:-1](v.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)  # (B, 1+N, C)
        blk, C = v.transformer.resblocks[-1], x.shape[-1]
        val = blk.ln_1(x) @ blk.attn.in_proj_weight[2 * C:].T + blk.attn.in_proj_bias[2 * C:]
        x = x + val @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        x = x + blk.mlp(blk.ln_2(x))
        direct = v.ln_post(x[:, 1:]) @ v.proj  # (B, N, D)
        _, z_global, z_dense = ours.forward_dense(image, readout="maskclip")
    assert z_dense.shape == (2, 32, 4, 4)
    assert torch.allclose(z_dense.flatten(2).transpose(1, 2), direct, atol=1e-5)
    assert torch.allclose(z_global, peer.encode_image(image), atol=1e-5)
    with pytest.raises(ValueError, match="read-out"):
        ours.forward_dense(image, readout="maskclp")


def test_zero_shot_segmenter_ensembles_prompts_and_scores_with_clip_scale(peer):
    torch.manual_seed(0)
    names = ["ring", "star"]  # 2 x 80 prompts: enough to check the ensembling, cheap on CPU
    model = ZeroShotSegmenter(load_clip(peer.state_dict()), names, ZeroShotConfig(readout="maskclip"))
    with torch.no_grad():  # OpenAI's recipe for one class, with OpenAI's encode_text
        feats = F.normalize(peer.encode_text(openai_clip.tokenize([t.format("star") for t in IMAGENET_TEMPLATES])))
        star = F.normalize(feats.mean(0), dim=0)
        assert torch.allclose(model.text_embeddings[0, 1], star, atol=1e-5)
        image = torch.randn(1, 3, 64, 96)
        logits = model(image)
        z = model.visual.forward_dense(image, "maskclip")[2]
        s = torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), F.normalize(model.text_embeddings[0], dim=1))
        expected = F.interpolate(s * peer.logit_scale.exp(), size=(64, 96), mode="bilinear", align_corners=False)
        probs = model.predict(image, mode="slide")  # the segmentor's inference, windows of CLIP's 64 px
    assert logits.shape == (1, 2, 64, 96) and torch.allclose(logits, expected, atol=1e-4)
    assert probs.shape == logits.shape and torch.allclose(probs.sum(1), torch.ones(1, 64, 96), atol=1e-5)


def test_eval_zero_shot_uses_the_same_miou_code(peer, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    sd = peer.state_dict()
    torch.save(sd, path)  # a plain state dict with OpenAI key names
    res = evaluation.main([str(path), "--zero-shot", "--readout", "denseclip", "--templates", "photo",
                           "--val-size", "3", "--crop-size", "64", "--workers", "0"])
    model = ZeroShotSegmenter(load_clip(sd), SHAPE_CLASSES, ZeroShotConfig(readout="denseclip", templates="photo"))
    ds = ProceduralShapes("val", size=64, length=3)
    cm = ConfusionMatrix(len(SHAPE_CLASSES), 255)
    with torch.no_grad():
        for i in range(3):
            image, label = ds[i]
            cm.update(model(image[None]).argmax(1), label[None])
    assert res["mIoU"] == pytest.approx(cm.compute()["mIoU"])


def test_random_clip_tool_writes_openai_keys_that_load_clip_reads(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import random_clip

    random_clip.main([str(tmp_path / "r.pt")])
    model = random_clip.random_clip(0).eval()
    loaded = load_clip(str(tmp_path / "r.pt"))
    image, text = torch.randn(1, 3, 128, 128), openai_clip.tokenize(["a photo of a star."])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image), model.encode_image(image))
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))
