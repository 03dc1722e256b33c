"""CLIP towers: parity with open_clip and OpenAI CLIP on shared random weights, dense outputs."""
import warnings

import open_clip
import pytest
import torch
from peers import openai_clip, tiny_openai_clip

from denseclip.checkpoint import load_clip
from denseclip.clip import TextEncoder, VisionTransformer, resize_pos_embed
from denseclip.resnet import pos_embed_to_grid


def _texts(n=4):
    return openai_clip.tokenize(["a photo of a cat", "wall", "a diagram", "chest of drawers!"][:n])


@pytest.mark.parametrize("name", ["RN50", "RN101", "ViT-B-16"])
def test_parity_with_open_clip(name):
    torch.manual_seed(0)
    peer = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()
    ours = load_clip(peer.state_dict())
    image = torch.randn(2, 3, 224, 224)
    text = _texts()
    with torch.no_grad():
        img_err = (ours.encode_image(image) - peer.encode_image(image)).abs().max().item()
        txt_err = (ours.encode_text(text) - peer.encode_text(text)).abs().max().item()
    assert img_err < 1e-5 and txt_err < 1e-5, (img_err, txt_err)


def test_torchscript_archive_loads_like_openai(tmp_path):
    torch.manual_seed(0)
    model = tiny_openai_clip()
    image, text = torch.randn(2, 3, 64, 64), _texts()
    archive = tmp_path / "RN-tiny.pt"
    traced = torch.jit.trace(model, (image, text), check_trace=False)
    traced.half().save(str(archive))  # OpenAI ships fp16 TorchScript archives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = openai_clip.load(str(archive), device="cpu", jit=False)  # casts back to fp32 on CPU
    ours = load_clip(str(archive))
    with torch.no_grad():
        assert (ours.encode_image(image) - ref.encode_image(image)).abs().max() < 1e-5
        assert (ours.encode_text(text) - ref.encode_text(text)).abs().max() < 1e-5


def test_plain_state_dict_file_loads(tmp_path):
    torch.manual_seed(0)
    model = tiny_openai_clip()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ours = load_clip(str(tmp_path / "sd.pt"))
    text = _texts()
    with torch.no_grad():
        assert (ours.encode_text(text) - model.encode_text(text)).abs().max() < 1e-5


def test_attention_pool_global_equals_clip_and_dense_shape():
    torch.manual_seed(0)
    model = load_clip(tiny_openai_clip().state_dict())
    for size in (64, 96):  # 96: the positional grid is resized from 2x2 to 3x3
        image = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats, z_global, z_dense = model.visual.forward_dense(image)
            assert torch.allclose(z_global, model.encode_image(image), atol=1e-6)
        assert [f.shape[-1] for f in feats] == [size // 4, size // 8, size // 16, size // 32]
        assert z_dense.shape == (2, 64, size // 32, size // 32)


def test_dense_map_is_attention_with_each_position_as_query():
    """With a 1x1 grid there is one spatial token: querying with it must equal the mean token's
    query, because the mean of one token is itself (same tokens, same positional rows if equal)."""
    torch.manual_seed(0)
    pool = load_clip(tiny_openai_clip().state_dict()).visual.attnpool
    with torch.no_grad():
        pool.positional_embedding[1:] = pool.positional_embedding[:1]
        z_global, z_dense = pool(torch.randn(3, 512, 1, 1))
    assert torch.allclose(z_dense[:, :, 0, 0], z_global, atol=1e-6)


def test_vit_dense_outputs_and_pyramid():
    torch.manual_seed(0)
    vit = VisionTransformer(64, 16, width=64, layers=4, heads=2, output_dim=32, out_indices=(0, 1, 2, 3),
                            pyramid=True).eval()
    for size in (64, 96):
        image = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats, z_global, z_dense = vit.forward_dense(image)
            if size == 64:
                assert torch.allclose(z_global, vit(image), atol=1e-6)
        g = size // 16
        assert [tuple(f.shape[-2:]) for f in feats] == [(4 * g, 4 * g), (2 * g, 2 * g), (g, g), (g // 2, g // 2)]
        assert z_dense.shape == (2, 32, g, g)


def test_vit_class_embedding_twice_flag():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 16, width=64, layers=1, heads=2, output_dim=32).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        once = vit(image)
        vit.add_class_embedding_twice = True
        twice = vit(image)
        # adding it twice equals adding it once with the class row of the positional embedding shifted
        vit.add_class_embedding_twice = False
        vit.positional_embedding[0] += vit.class_embedding
        shifted = vit(image)
    assert not torch.allclose(once, twice)
    assert torch.allclose(twice, shifted, atol=1e-6)


def test_text_contexts():
    torch.manual_seed(0)
    enc = TextEncoder(context_length=13, width=64, heads=2, layers=2, embed_dim=32).eval()
    text = openai_clip.tokenize(["wall", "sky", "chest of drawers"], context_length=5)
    with torch.no_grad():
        plain = enc(text)
        assert torch.allclose(enc(text, torch.zeros(1, 0, 64)), plain[None], atol=1e-6)  # zero contexts == plain
        ctx = torch.randn(2, 8, 64)
        out = enc(text, ctx)
        assert out.shape == (2, 3, 32)
        # reference: write the prompt sequence out by hand and read the EOT position (5-token text + 8)
        x = enc.token_embedding(text)
        seq = torch.cat([x[:, :1], ctx[1:2].expand(3, -1, -1), x[:, 1:]], dim=1) + enc.positional_embedding
        seq = enc.ln_final(enc.transformer(seq, causal=True))
        ref = seq[torch.arange(3), text.argmax(-1) + 8] @ enc.text_projection
        assert torch.allclose(out[1], ref, atol=1e-6)


def test_text_positional_embedding_truncates_to_sequence():
    torch.manual_seed(0)
    enc = TextEncoder(context_length=77, width=64, heads=2, layers=1, embed_dim=32).eval()
    short = openai_clip.tokenize(["wall", "sky"], context_length=13)
    long = openai_clip.tokenize(["wall", "sky"])
    with torch.no_grad():  # causal attention: padding after EOT cannot change the EOT feature
        assert torch.allclose(enc(short), enc(long), atol=1e-5)


def test_resize_pos_embed_identity_and_shape():
    pos = torch.randn(1 + 16, 8)
    # at the stored grid the bilinear resize is exactly the identity: no branch for it, one traced graph (ONNX)
    assert torch.equal(resize_pos_embed(pos, (4, 4)), pos) and torch.equal(pos_embed_to_grid(pos, (4, 4)), pos)
    out = resize_pos_embed(pos, (6, 3))
    assert out.shape == (1 + 18, 8) and torch.equal(out[0], pos[0])
