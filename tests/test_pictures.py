"""Pictures that explain themselves (issue 19): demo.py and eval.py --show-dir draw one picture, the prediction of a
trained tiny model blended over the photo (enlarged when small) with a title and a legend whose names, colours and
shares are the prediction's; the label PNG keeps the class indices; the class colours stay visible and distinct for
any number of names (open vocabulary); detection pictures list the classes of the boxes drawn, or say that none
reached the threshold."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseclip import build_model
from denseclip.data.procedural import SHAPE_CLASSES, ProceduralShapes
from denseclip.run import visualize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import eval as evaluation  # noqa: E402

STEPS = 60  # AdamW steps on two 64-pixel images: ~3 s on one thread, enough to predict 2-3 classes per image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model overfitted on the first two validation images (so that it predicts several classes), saved as
    train.py saves it, and those images as PNG files."""
    tmp = tmp_path_factory.mktemp("pictures")
    torch.manual_seed(0)
    data = ProceduralShapes("val", size=64, length=2)
    x, y = torch.stack([data[i][0] for i in range(2)]), torch.stack([data[i][1] for i in range(2)])
    model = build_model("denseclip_tiny", SHAPE_CLASSES, head_dropout=0.0, decoder_dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = sum(model(x, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp / f"iter_{STEPS:06d}.pt"
    torch.save({"model": model.eval().state_dict(), "class_names": list(SHAPE_CLASSES),
                "args": {"model": "denseclip_tiny", "dataset": "procedural", "overrides": ["head_dropout=0.0",
                                                                                          "decoder_dropout=0.0"]}},
               ckpt)
    (tmp / "images").mkdir()
    for i in range(2):
        Image.fromarray(data.raw(i)[0]).save(tmp / "images" / f"{i:06d}.png")
    return ckpt, tmp


def read_png(path):
    im = Image.open(path)
    return np.asarray(im.convert("RGB")), {k: json.loads(v) for k, v in im.text.items()}


def check_explained(picture, info, photo, pred, names):
    """The picture's view is the blend of the prediction's colours over the (enlarged) photo, white where classes
    meet; its legend lists exactly the classes present, largest share first, each in its colour with its share; a
    swatch of each colour sits right of the view; the title is drawn above it."""
    H, W = pred.shape
    colours = visualize.class_colours(len(names))
    present, counts = np.unique(pred, return_counts=True)
    by_share = sorted(zip(present.tolist(), counts.tolist()), key=lambda kc: -kc[1])
    assert [e["name"] for e in info["legend"]] == [names[k] for k, _ in by_share]
    assert [tuple(e["colour"]) for e in info["legend"]] == [colours[k] for k, _ in by_share]
    assert [e["share"] for e in info["legend"]] == pytest.approx([c / pred.size for _, c in by_share])
    x0, y0, f = info["view"]
    assert f == visualize.display_factor(H, W) and (max(H, W) * f >= visualize.DISPLAY or f == 1)
    view = picture[y0:y0 + H * f, x0:x0 + W * f].astype(np.float32)
    big = visualize.enlarge_labels(pred, f)
    edges = visualize.boundaries(big)
    expected = (1 - visualize.ALPHA) * visualize.enlarge(photo, f) + visualize.ALPHA * np.float32(colours)[big]
    assert np.abs(view - expected)[~edges].max() <= 0.5 + 1e-3
    assert (view[edges] == 255).all()
    legend = picture[y0:, x0 + W * f:]
    for k, _ in by_share:
        assert (legend == colours[k]).all(-1).sum() >= (visualize.text_size(W * f) - 2) ** 2  # its swatch
    assert info["title"] and (picture[:y0].sum(-1) < 200).sum() > 50  # dark title text above the view


def test_demo_picture_explains_the_prediction(trained, capsys):
    ckpt, tmp = trained
    out = tmp / "demo"
    written = demo.main([str(ckpt), str(tmp / "images"), "--out-dir", str(out)])
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert sorted(Path(p).relative_to(out).as_posix() for p in written) == files == [
        "000000.png", "000000_label.png", "000001.png", "000001_label.png"]
    assert f"wrote 4 file(s) for 2 image(s) to {out}" in capsys.readouterr().out
    classes_seen = set()
    for i in range(2):
        photo = np.asarray(Image.open(tmp / "images" / f"{i:06d}.png"))
        label = Image.open(out / f"{i:06d}_label.png")
        pred = np.asarray(label).astype(np.int64)
        assert label.mode == "P" and pred.shape == (64, 64)
        assert label.getpalette()[:6] == [*visualize.class_colours(1)[0], *visualize.class_colours(2)[1]]
        picture, info = read_png(out / f"{i:06d}.png")
        check_explained(picture, info, photo, pred, SHAPE_CLASSES)
        assert info["view"][2] == 6  # a 64-pixel image is shown at 384
        assert info["title"] == [f"model denseclip_tiny | checkpoint {ckpt.name} | image {i:06d}.png"]
        classes_seen |= set(np.unique(pred).tolist())
    assert len(classes_seen) >= 3  # the trained model tells shapes apart: the legend has something to say


def test_eval_show_dir_draws_the_same_picture(trained):
    ckpt, tmp = trained
    show = tmp / "show"
    evaluation.main([str(ckpt), "--val-size", "2", "--crop-size", "64", "--workers", "0", "--show-dir", str(show)])
    assert sorted(p.name for p in show.iterdir()) == ["000000.png", "000000_label.png", "000001.png",
                                                      "000001_label.png"]
    demo.main([str(ckpt), str(tmp / "images"), "--out-dir", str(tmp / "demo_for_eval")])
    for i in range(2):
        pred = np.asarray(Image.open(show / f"{i:06d}_label.png")).astype(np.int64)
        demo_pred = np.asarray(Image.open(tmp / "demo_for_eval" / f"{i:06d}_label.png"))
        assert np.array_equal(pred, demo_pred)  # same model, same pixels, same prediction
        picture, info = read_png(show / f"{i:06d}.png")
        photo = visualize.denormalize(ProceduralShapes("val", size=64, length=2)[i][0])
        check_explained(picture, info, photo, pred, SHAPE_CLASSES)
        assert info["title"] == [f"model denseclip_tiny | checkpoint {ckpt.name} | image {i:06d}.png"]


def test_open_vocabulary_palette_is_visible_and_distinct_for_200_names():
    colours = np.array(visualize.class_colours(200))
    assert colours.shape == (200, 3) and len({tuple(c) for c in colours}) == 200
    lab = visualize.srgb_to_lab(colours)
    assert lab[:, 0].min() >= visualize.LIGHTNESS[0] - 1 and colours.max(1).min() >= 60  # nothing black or near it
    assert lab[:, 0].max() <= 90  # nothing lost on the white legend
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(200) * 1e9
    assert dist.min() > 10  # CIELAB distance: ~2 is just noticeable; 10+ reads as another colour
    assert visualize.class_colours(50) == visualize.class_colours(200)[:50]  # a class keeps its colour
    assert visualize.class_colours(3)[0] != (0, 0, 0)  # the first name is not drawn black (issue 19)
    # a prediction over all 200 names: the legend takes several columns, every colour shows as a swatch
    names = [f"name {k}" for k in range(200)]
    pred = np.arange(200).repeat(2)[:, None].repeat(8, axis=1).reshape(40, 80)  # 2 x 8 pixels per class
    photo = np.full((40, 80, 3), 128, np.uint8)
    picture, info = visualize.segmentation_picture(photo, pred, names, ("model x",))
    check_explained(np.asarray(picture), info, photo, pred, names)
    label = visualize.label_png(pred, 200)
    assert np.array_equal(np.asarray(label), pred) and label.getpalette()[3 * 199:3 * 200] == list(colours[199])


def test_detection_picture_lists_the_boxes_drawn_or_says_none():
    image = torch.full((3, 40, 50), 0.5)
    names = ["cat", "dog", "car"]
    det = {"boxes": torch.tensor([[30.0, 5.0, 45.0, 35.0], [2.0, 2.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0]]),
           "scores": torch.tensor([0.9, 0.6, 0.1]), "labels": torch.tensor([1, 1, 2])}
    title = ("model m", "checkpoint c", "image i")
    picture, info = visualize.detection_picture(image, det, names, title)
    colours = visualize.class_colours(3)
    assert info["legend"] == [{"name": "dog", "colour": list(colours[1]), "boxes": 2, "best": pytest.approx(0.9)}]
    assert info["note"] is None and info["title"] == ["model m | checkpoint c | image i"]
    x0, y0, f = info["view"]
    pic = np.asarray(picture)
    assert f == 8 and (pic[y0 + 20 * f, x0 + 30 * f] == colours[1]).all()  # the box's left edge, enlarged
    assert not (pic == colours[2]).all(-1).any()  # the car (score 0.1 < 0.3) is not drawn, nor in the legend
    none, info = visualize.detection_picture(image, {**det, "scores": det["scores"] * 0.1}, names, title)
    assert info["legend"] == [] and info["note"] == "no detection with score >= 0.30"
    assert (np.asarray(none)[y0:, x0 + 50 * f:] == visualize.NOTE).all(-1).sum() > 20  # the note is written
