"""demo.py end to end on the tiny config, and the pictures it writes: sizes (EXIF-rotated, any mode, a large image
through slide inference), legend names and swatches, blend colours from the palette entries of the predicted
classes, heat maps that brighten with the score, open-vocabulary names, official and text-free checkpoints."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from denseclip.run import visualize
from denseclip.data.image_io import read_image
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES, render_shapes
from denseclip import build_model, language
from test_pictures import check_explained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import eval as evaluation  # noqa: E402



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model saved as train.py saves it, and three images: an EXIF-rotated JPEG, a greyscale PNG, and one
    larger than the test crop (128) so that it goes through slide inference."""
    tmp = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES).eval()
    ckpt = tmp / "iter_000010.pt"
    torch.save({"model": model.state_dict(), "args": {"model": "denseclip_tiny", "dataset": "procedural",
                                                      "overrides": []}, "class_names": list(SHAPE_CLASSES)}, ckpt)
    rng = np.random.default_rng(0)
    images = tmp / "images"
    (images / "sub").mkdir(parents=True)
    rotated = Image.fromarray(render_shapes(rng, 96)[0][:, :72])  # 72 wide x 96 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view -> 96 wide x 72 high upright
    rotated.save(images / "rotated.jpg", exif=exif)
    Image.fromarray(render_shapes(rng, 64)[0]).convert("L").save(images / "sub" / "grey.png")
    Image.fromarray(np.concatenate([render_shapes(rng, 160)[0]] * 2, axis=1)).save(images / "large.png")
    return model, ckpt, images, tmp


def normalized(photo):
    """(1, 3, H, W) with CLIP's mean/std, written out here rather than taken from the package."""
    x = (photo / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]


def read_png(path):
    im = Image.open(path)
    return np.asarray(im.convert("RGB")), {k: json.loads(v) for k, v in im.text.items()}


def test_demo_writes_blend_legend_and_label_at_input_size(setup):
    model, ckpt, images, tmp = setup
    out = tmp / "out"
    written = demo.main([str(ckpt), str(images), "--out-dir", str(out)])
    assert sorted(Path(p).relative_to(out).as_posix() for p in written) == [
        "large.png", "large_label.png", "rotated.png", "rotated_label.png", "sub/grey.png", "sub/grey_label.png"]
    sizes = {"rotated": (72, 96), "sub/grey": (64, 64), "large": (160, 320)}  # (H, W) upright
    for name, (H, W) in sizes.items():
        photo = read_image(next(images.glob(name + ".*")))
        assert photo.shape == (H, W, 3)
        label = Image.open(out / f"{name}_label.png")
        assert label.mode == "P" and label.size == (W, H)
        pred = np.asarray(label).astype(np.int64)
        assert pred.max() < len(SHAPE_CLASSES)
        picture, text = read_png(out / f"{name}.png")
        check_explained(picture, text, photo, pred, SHAPE_CLASSES)  # blend, legend, title (tests/test_pictures.py)
        assert text["view"][2] == (4 if name == "rotated" else 6 if name == "sub/grey" else 2)  # long side >= 384
    # the large image went through slide windows: its prediction is the model's slide prediction
    photo = read_image(images / "large.png")
    x = normalized(photo)
    direct = model.predict(x, mode="slide")[0].argmax(0).numpy()
    assert (direct == np.asarray(Image.open(out / "large_label.png"))).mean() > 0.999


def test_score_map_picture_brightens_with_the_score(setup):
    model, ckpt, images, tmp = setup
    out = tmp / "scores"
    names = ["circle", "star", "kettle"]  # a training class names and one it never saw
    demo.main([str(ckpt), str(images / "rotated.jpg"), "--out-dir", str(out), "--score-maps", ",".join(names)])
    photo = read_image(images / "rotated.jpg")
    H, W = photo.shape[:2]
    with torch.no_grad():  # the cosine score maps written out: backbone, score map for these names, resize
        _, zg, zd = model.backbone.forward_dense(normalized(photo))
        s = language.score_map(zd, language.context_aware_text(model, zg, zd, names))  # (1, K, h, w)
        s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)[0]
    s = s.numpy()
    picture, text = read_png(out / "rotated_scores.png")
    assert text["names"] == names and text["range"] == pytest.approx([s.min(), s.max()], abs=1e-5)
    assert picture.shape[0] == visualize.ROW + H
    assert np.array_equal(picture[visualize.ROW:, :W], photo)
    t = (s - s.min()) / (s.max() - s.min())  # (K, H, W): one range shared by the names
    heats = []
    for k in range(len(names)):
        over = picture[visualize.ROW:, (k + 1) * W:(k + 2) * W].astype(np.float32)
        heats.append((over - (1 - visualize.HEAT_ALPHA) * photo) / visualize.HEAT_ALPHA)  # the heat colour
        # the blend's uint8 rounding (0.5 / alpha), and one colour level where this t and the demo's (score_logits
        # * tau: ~1e-7 apart) fall on the two sides of a rounding step
        assert np.abs(heats[-1] - visualize.heat_colours(t[k])).max() <= 0.5 / visualize.HEAT_ALPHA + 1 + 1e-6
    intensity = np.stack(heats).sum(-1).ravel()[np.argsort(t.ravel())]  # every pixel of every name, by score
    assert np.all(np.diff(intensity) > -4)  # non-decreasing up to rounding
    assert intensity[-10:].mean() > 700 and intensity[:10].mean() < 10  # white at the maximum, black at the minimum
    ramp = visualize.heat_colours(np.linspace(0, 1, 50)).astype(int)
    assert np.all(np.diff(ramp, axis=0) >= 0) and np.all(np.diff(ramp.sum(1)) > 0)


def test_open_vocabulary_demo_uses_the_score_map(setup):
    model, ckpt, images, tmp = setup
    out = tmp / "open"
    names = ["disc", "box", "sky"]
    demo.main([str(ckpt), str(images / "sub"), "--out-dir", str(out), "--classes", ",".join(names)])
    photo = read_image(images / "sub" / "grey.png")
    x = normalized(photo)
    expected = model.score_logits(x, names)[0].argmax(0).numpy()
    pred = np.asarray(Image.open(out / "grey_label.png"))
    assert np.array_equal(pred, expected)
    _, text = read_png(out / "grey.png")
    assert sorted(e["name"] for e in text["legend"]) == sorted(names[k] for k in np.unique(pred))


def test_official_and_text_free_checkpoints(setup, capsys):
    model, ckpt, images, tmp = setup
    photo = read_image(images / "sub" / "grey.png")
    x = normalized(photo)
    ref = model.predict(x)[0].argmax(0).numpy()
    official = tmp / "official.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, official)
    export = build_model("denseclip_tiny", SHAPE_CLASSES).eval()
    export.load_state_dict(model.state_dict())
    torch.save(language.drop_text_encoder(export).state_dict(), tmp / "export.pt")  # text-free: no text encoder at all
    names = ",".join(SHAPE_CLASSES)
    for path, out in ((official, "off"), (tmp / "export.pt", "free")):
        demo.main([str(path), str(images / "sub"), "--out-dir", str(tmp / out), "--model", "denseclip_tiny",
                   "--class-names", names, "--no-resize"])  # official defaults resize to (2048, 512) otherwise
        assert np.array_equal(np.asarray(Image.open(tmp / out / "grey_label.png")), ref)
    with pytest.raises(ValueError, match="no text encoder"):  # a text-free export knows only its classes
        demo.main([str(tmp / "export.pt"), str(images / "sub"), "--out-dir", str(tmp / "x"), "--model",
                   "denseclip_tiny", "--class-names", names, "--classes", "kettle"])
    with pytest.raises(ValueError, match="--model is required"):  # a ConfigError: error, exit status 2
        demo.main([str(official), str(images / "sub")])


def test_eval_show_dir_writes_score_maps(setup):
    model, ckpt, images, tmp = setup
    show = tmp / "show"
    evaluation.main([str(ckpt), "--val-size", "3", "--crop-size", "64", "--workers", "0", "--show-dir", str(show),
                     "--score-maps", "circle,kettle", "--score-map-images", "2"])
    assert sorted(p.name for p in show.glob("*_scores.png")) == ["000000_scores.png", "000001_scores.png"]
    picture, text = read_png(show / "000000_scores.png")
    assert text["names"] == ["circle", "kettle"] and picture.shape[0] == visualize.ROW + 64
    photo = ProceduralShapes("val", size=64, length=1).raw(0)[0]
    assert np.abs(picture[visualize.ROW:, :64].astype(int) - photo).max() <= 1  # the photo, un-normalised
