"""Zero-shot segmentation from raw CLIP weights: MaskCLIP's ResNet read-out against a direct computation from the
OpenAI model's weights (the ViT read-outs: test_readouts.py), OpenAI's prompt ensembling, the protocol's steps on
hand-made score maps (synonyms, background threshold, SCLIP's area rule, sliding windows, the short side), and
`eval.py --zero-shot` through the same mIoU code."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from peers import openai_clip, tiny_openai_clip

from denseclip import inference, zeroshot
from denseclip.checkpoint import load_clip
from denseclip.errors import ConfigError
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES
from denseclip.run.metrics import ConfusionMatrix
from denseclip.zeroshot import IMAGENET_TEMPLATES, ZeroShotConfig, ZeroShotSegmenter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402


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


def test_zero_shot_segmenter_ensembles_prompts_and_scores_with_the_logit_scale(peer):
    torch.manual_seed(0)
    names = ["ring", "star"]  # 2 x 80 prompts: enough to check the ensembling, cheap on CPU
    model = ZeroShotSegmenter(load_clip(peer.state_dict()), names, ZeroShotConfig(readout="maskclip", test_crop=64,
                                                                                   test_stride=32))
    with torch.no_grad():  # OpenAI's recipe for one class, with OpenAI's encode_text
        feats = F.normalize(peer.encode_text(openai_clip.tokenize([t.format("star") for t in IMAGENET_TEMPLATES])))
        star = F.normalize(feats.mean(0), dim=0)
        assert torch.allclose(model.text_embeddings[0, 1], star, atol=1e-5)
        image = torch.randn(1, 3, 64, 96)
        logits = model(image)
        z = model.visual.forward_dense(image, "maskclip")[2]
        s = torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), F.normalize(model.text_embeddings[0], dim=1))
        expected = F.interpolate(s * 40.0, size=(64, 96), mode="bilinear", align_corners=False)  # SCLIP's scale 40
        probs = model.predict(image)  # the protocol: windows of CLIP's 64 px at stride 32
        windows = inference.slide_inference(model, image, 64, 32).softmax(1)
        cosine = model.score_logits(image, ["star"]) * model.cfg.tau  # any name, as demo.py's score maps
    assert logits.shape == (1, 2, 64, 96) and torch.allclose(logits, expected, atol=1e-4)
    assert probs.shape == logits.shape and torch.allclose(probs, windows, atol=1e-6)
    assert torch.allclose(cosine, expected[:, 1:] / 40.0, atol=1e-5)
    with pytest.raises(ValueError, match="ViT"):
        ZeroShotSegmenter(load_clip(peer.state_dict()), names, ZeroShotConfig(readout="naclip"))


def fake_model(peer, names, logits_of, **cfg):
    """A ZeroShotSegmenter whose per-query logits are hand-made (logits_of(images) -> (B, Q, H, W)), so that the
    protocol's steps can be checked on known score maps."""
    model = ZeroShotSegmenter(load_clip(peer.state_dict()), names, ZeroShotConfig(templates="photo", **cfg))
    model.forward = lambda images, text=None: logits_of(images)
    return model


def logits(*rows):
    """Hand-made per-query probabilities (Q, W) of a 1-row image -> logits whose softmax gives them back."""
    return torch.tensor(rows, dtype=torch.float64).log()[None, :, None, :]  # (1, Q, 1, W)


def test_a_class_scores_as_its_best_synonym_after_the_softmax_over_all_queries(peer):
    """Queries 'dog', 'puppy' (class 0) and 'cat' (class 1): at pixel 0 dog and puppy share 0.6 (0.3 each) and
    cat has 0.4, so cat wins (a class is its best synonym, not their sum); at pixel 1 puppy alone beats cat."""
    probs = logits([0.3, 0.1], [0.3, 0.6], [0.4, 0.3])
    model = fake_model(peer, ["dog, puppy", "cat"], lambda images: probs, test_mode="whole")
    out = model.predict(torch.zeros(1, 3, 1, 2, dtype=torch.float64))
    assert model.query_class.tolist() == [0, 0, 1] and out.shape == (1, 2, 1, 2)
    assert torch.allclose(out[0, :, 0], torch.tensor([[0.3, 0.6], [0.4, 0.3]], dtype=torch.float64))
    assert out.argmax(1).tolist() == [[[1, 0]]]
    with pytest.raises(ValueError, match="empty synonym"):
        fake_model(peer, ["dog,,puppy", "cat"], lambda images: probs)


def test_background_threshold_and_area_rule(peer):
    """bg_threshold: pixels whose best class probability is under it become class 0 (the others keep their class);
    off, the argmax stands. area_threshold (SCLIP's rule): a class on too small a share of the non-background
    pixels is dropped, its pixels go to the next best class."""
    probs = logits([0.2, 0.1, 0.1, 0.1, 0.1], [0.7, 0.45, 0.8, 0.8, 0.2], [0.1, 0.45, 0.1, 0.1, 0.7])
    names = ["background", "cat", "dog"]
    plain = fake_model(peer, names, lambda images: probs, test_mode="whole")
    image = torch.zeros(1, 3, 1, 5, dtype=torch.float64)
    assert plain.predict(image).argmax(1).tolist() == [[[1, 1, 1, 1, 2]]]  # 0.45 / 0.45: the first wins
    thresholded = fake_model(peer, names, lambda images: probs, test_mode="whole", bg_threshold=0.5)
    assert thresholded.predict(image).argmax(1).tolist() == [[[1, 0, 1, 1, 2]]]
    area = fake_model(peer, names, lambda images: probs, test_mode="whole", area_threshold=0.2)
    assert area.predict(image).argmax(1).tolist() == [[[1, 1, 1, 1, 1]]]  # dog: 1 of 5 pixels, not > 0.2 x 5
    assert fake_model(peer, names, lambda images: probs, test_mode="whole", area_threshold=0.19).predict(
        image).argmax(1).tolist() == [[[1, 1, 1, 1, 2]]]


def test_sliding_windows_decide_locally(peer):
    """A hand-made forward that pools its whole input (each class's logit: 10 x the window's mean of one image
    channel). Whole image: the left half's class wins everywhere. Windows of 4 at stride 4: each half its own class;
    at stride 2 the overlapping columns average two windows, as specified (mmseg's slide)."""
    image = torch.zeros(1, 3, 2, 8, dtype=torch.float64)
    image[0, 0, :, :4], image[0, 1, :, 4:] = 1.0, 0.6  # class 0 left, class 1 right (weaker)
    pooled = lambda x: 10 * x[:, :2].mean(dim=(2, 3), keepdim=True).expand(-1, -1, *x.shape[-2:])  # noqa: E731
    for mode, stride, want in (("whole", 4, [0] * 8), ("slide", 4, [0] * 4 + [1] * 4),
                               ("slide", 2, [0, 0, 0, 0, 1, 1, 1, 1])):
        model = fake_model(peer, ["a", "b"], pooled, test_mode=mode, test_crop=4, test_stride=stride)
        assert model.predict(image).argmax(1)[0, 0].tolist() == want, (mode, stride)
    model = fake_model(peer, ["a", "b"], pooled, test_mode="slide", test_crop=4, test_stride=2)
    probs = model.predict(image)[0, :, 0]  # column 2: windows [0, 4) and [2, 6): means (1, 0) and (0.5, 0.3)
    assert torch.allclose(probs[:, 2], torch.tensor([7.5, 1.5], dtype=torch.float64).softmax(0))


def pamr_by_convolution(image, logits, steps, dilations):
    """PAMR written as its reference code structures it: 3 x 3 one-hot kernels at each dilation (replicate
    padding) give the neighbours; affinities -|x - x_n| / (1e-8 + 0.1 std), mean over channels, softmax over the
    neighbours; each step a weighted sum of the neighbours' logits."""
    def kernels(with_centre):
        ks = []
        for y in range(3):
            for x in range(3):
                if with_centre or (y, x) != (1, 1):
                    k = torch.zeros(1, 3, 3, dtype=image.dtype)
                    k[0, y, x] = 1
                    ks.append(k)
        return torch.stack(ks)  # (P, 1, 3, 3)

    def neighbours(t, ks):  # (B, C, H, W) -> (B, C, P * len(dilations), H, W)
        B, C, H, W = t.shape
        flat = t.reshape(B * C, 1, H, W)
        out = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), ks, dilation=d) for d in dilations]
        return torch.cat(out, dim=1).view(B, C, -1, H, W)

    std = neighbours(image, kernels(True)).std(dim=2, keepdim=True)
    centre = image[:, :, None]
    aff = (-(centre - neighbours(image, kernels(False))).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True)
    aff = aff.softmax(dim=2)
    for _ in range(steps):
        logits = (neighbours(logits, kernels(False)) * aff).sum(dim=2)
    return logits


def test_pamr_refines_the_logits_before_the_softmax(peer):
    """pamr equals the convolution form (non-square, float64, NACLIP's dilations 8 and 16 on a 20 x 27 image, so the
    replicated edges matter); with pamr_steps the protocol refines the logits at the label's size, before the
    softmax over the queries."""
    torch.manual_seed(0)
    image, lg = torch.randn(2, 3, 20, 27, dtype=torch.float64), torch.randn(2, 4, 20, 27, dtype=torch.float64)
    ours = zeroshot.pamr(image, lg, steps=3, dilations=(8, 16))
    assert (ours - pamr_by_convolution(image, lg, 3, (8, 16))).abs().max().item() <= 1e-12
    assert (ours - lg).abs().max().item() > 0.1
    small = torch.randn(1, 4, 10, 14, dtype=torch.float64)
    model = fake_model(peer, ["a", "b", "c", "d"], lambda images: small, test_mode="whole", pamr_steps=2,
                       pamr_dilations=(1, 2))
    x = torch.randn(1, 3, 10, 14, dtype=torch.float64)
    want = pamr_by_convolution(F.interpolate(x, size=(20, 28), mode="bilinear", align_corners=False),
                               F.interpolate(small, size=(20, 28), mode="bilinear", align_corners=False), 2, (1, 2))
    assert torch.allclose(model.predict(x, out_size=(20, 28)), want.softmax(1), atol=1e-12)


def test_eval_zero_shot_uses_the_same_miou_code(peer, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    sd = peer.state_dict()
    torch.save(sd, path)  # a plain state dict with OpenAI key names
    res = evaluation.main([str(path), "--zero-shot", "--readout", "denseclip", "--templates", "photo",
                           "--val-size", "3", "--crop-size", "64", "--workers", "0"])
    cfg = ZeroShotConfig(readout="denseclip", templates="photo", test_crop=64, test_stride=32, bg_threshold=0.1)
    model = ZeroShotSegmenter(load_clip(sd), SHAPE_CLASSES, cfg)  # the built-in data have a background class
    ds = ProceduralShapes("val", size=64, length=3)
    cm = ConfusionMatrix(len(SHAPE_CLASSES), 255)
    with torch.no_grad():
        for i in range(3):
            image, label = ds[i]
            cm.update(model.predict(image[None]).argmax(1), label[None])
    assert res["mIoU"] == pytest.approx(cm.compute()["mIoU"])


def test_eval_zero_shot_resizes_to_the_short_side_and_reads_synonyms(peer, tmp_path, monkeypatch):
    """A folder dataset (40 x 60 images): under --zero-shot the test transform resizes to a short side of 336
    (--scale 2048 336), the prediction comes back at the label's size; --scale changes it; a --class-names file with
    synonyms gives one text query per synonym; a dataset without a background class refuses --bg-threshold."""
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / f"images/{split}/0.jpg")
        Image.fromarray(rng.integers(0, 3, (40, 60), dtype=np.uint8)).save(root / f"annotations/{split}/0.png")
    (root / "names.txt").write_text("background, sky, wall\ncat, kitten\ndog\n")
    torch.save(peer.state_dict(), tmp_path / "clip.pt")
    seen = []
    monkeypatch.setattr(ZeroShotSegmenter, "dense_features", lambda self, x: seen.append(tuple(x.shape)) or
                        torch.ones(len(x), 64, x.shape[-2] // 32, x.shape[-1] // 32))  # what the tower is given
    args = [str(tmp_path / "clip.pt"), "--zero-shot", "--dataset", "folder", "--data-root", str(root),
            "--class-names", str(root / "names.txt"), "--templates", "photo", "--workers", "0"]
    res = evaluation.main(args)
    # the 336 x 504 image in windows of CLIP's 64 px at stride 32, one batch: 10 rows x 15 columns
    assert seen == [(10 * 15, 3, 64, 64)] and evaluation.parse_args(args).scale == [2048, 336]
    label = np.asarray(Image.open(root / "annotations/validation/0.png"))  # constant features: one class everywhere,
    assert any(res["aAcc"] == pytest.approx((label == k).mean()) for k in range(3))  # scored at the label's 40 x 60
    seen.clear()
    evaluation.main([*args, "--scale", "2048", "64", "--mode", "whole"])
    assert seen == [(1, 3, 64, 96)]
    with pytest.raises(ConfigError, match="no background class"):
        evaluation.main([*args[:6], "--dataset", "ade20k", "--bg-threshold", "0.2"])


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


def test_demo_zero_shot_draws_the_protocols_prediction(tmp_path):
    """demo.py --zero-shot --readout naclip --classes ...: the photo resized to the short side 336, windows of CLIP's
    size, the prediction back at the photo's size, drawn as for a trained model (blend + legend, label PNG, score
    maps of any names)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import demo
    import random_clip
    from denseclip.data.transforms import normalize, rescale_size, resize_image, to_tensor

    torch.save(random_clip.openai_state_dict(random_clip.random_clip(0, vit=True)), tmp_path / "vit.pt")
    photo = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    names = ["cat", "sofa", "window"]
    demo.main([str(tmp_path / "vit.pt"), "--zero-shot", "--readout", "naclip", "--classes", ",".join(names),
               str(tmp_path / "photo.png"), "--out-dir", str(tmp_path / "out"), "--score-maps", "cat,sky",
               "--device", "cpu"])
    cfg = ZeroShotConfig(readout="naclip", test_crop=128, test_stride=64)  # CLIP's 128 px, half of it
    model = ZeroShotSegmenter(load_clip(str(tmp_path / "vit.pt")), names, cfg).eval()
    x = normalize(resize_image(to_tensor(photo), *rescale_size(200, 150, (2048, 336))))[None]  # (1, 3, 336, 448)
    assert x.shape[-2:] == (336, 448)
    expected = model.predict(x, out_size=(150, 200))[0].argmax(0).numpy()
    label = Image.open(tmp_path / "out/photo_label.png")
    assert label.size == (200, 150) and np.array_equal(np.asarray(label), expected)
    legend = json.loads(Image.open(tmp_path / "out/photo.png").text["legend"])
    assert [entry["name"] for entry in legend] == [names[k] for k in np.unique(expected)]
    assert json.loads(Image.open(tmp_path / "out/photo_scores.png").text["names"]) == ["cat", "sky"]
