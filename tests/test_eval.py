"""eval.py: slide == whole when one window covers the image, aug-test at ratio 1 == single scale, official-style
checkpoints, --show-dir / --out, and distributed evaluation on unpadded shards == one process."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import ROOT, make_folder_dataset, torchrun  # noqa: E402

sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
from denseclip.configs import config_overrides  # noqa: E402
from denseclip.run.evaluate import AUG_RATIOS, evaluate  # noqa: E402
from denseclip.run.tasks import SEGMENTATION  # noqa: E402
from denseclip.run.visualize import class_colours  # noqa: E402
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES  # noqa: E402
from denseclip.errors import ConfigError  # noqa: E402
from denseclip import build_model  # noqa: E402
from denseclip.inference import slide_inference  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("denseclip_tiny", SHAPE_CLASSES).eval()


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_slide_equals_whole_when_the_crop_covers_the_image(model, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = model(x)
    assert torch.equal(slide_inference(model, x, crop=96, stride=64), whole)  # one window, clipped to the image
    probs_slide = model.predict(x, mode="slide")  # the config's test_crop 128 covers it too
    assert torch.equal(probs_slide, model.predict(x, mode="whole"))


def test_slide_windows_cover_every_pixel(model):
    x = torch.randn(1, 3, 64, 96)
    out = slide_inference(model, x, crop=48, stride=32)  # overlapping windows, averaged
    assert out.shape == (1, len(SHAPE_CLASSES), 64, 96) and torch.isfinite(out).all()


def test_aug_test_at_ratio_one_without_flip_is_single_scale(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        single = model(x).softmax(dim=1)
    assert torch.equal(model.predict(x, ratios=(1.0,), flip=False, mode="whole"), single)
    # the full official aug test: probabilities at the requested size, and flipping the input flips the output
    probs = model.predict(x, out_size=(50, 70), ratios=AUG_RATIOS, flip=True, mode="whole")
    assert probs.shape == (2, len(SHAPE_CLASSES), 50, 70)
    assert torch.allclose(probs.sum(1), torch.ones(2, 50, 70), atol=1e-5)
    flipped = model.predict(x.flip(-1), out_size=(50, 70), ratios=AUG_RATIOS, flip=True, mode="whole")
    assert torch.allclose(flipped, probs.flip(-1), atol=1e-5)


def test_evaluate_ratio_one_equals_default(model):
    ds = ProceduralShapes("val", size=64, length=4)
    cpu = torch.device("cpu")
    a = evaluate(model, ds, cpu, SEGMENTATION)
    b = evaluate(model, ds, cpu, SEGMENTATION, ratios=[1.0], flip=False, mode="slide")
    assert torch.equal(a.mat, b.mat)


def test_official_checkpoint_show_dir_and_out(model, tmp_path, capsys):
    """An mmseg-style {'state_dict': ...} file, a folder dataset with a sub-folder; pictures named after the images
    (tests/test_pictures.py checks what they show) and label PNGs whose pixel values are the predicted classes."""
    data = make_folder_dataset(tmp_path / "data", n_train=1, n_val=3)
    ckpt = tmp_path / "official.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"iter": 80000}}, ckpt)
    show, out = tmp_path / "show", tmp_path / "res.json"
    res = evaluation.main([str(ckpt), "--model", "denseclip_tiny", *data, "--crop-size", "64", "--workers", "0",
                           "--show-dir", str(show), "--out", str(out)])
    assert json.loads(out.read_text())["mIoU"] == res["mIoU"]
    assert sorted(p.relative_to(show).as_posix() for p in show.rglob("*.png")) == [
        f"sub/{i}{s}.png" for i in range(3) for s in ("", "_label")]
    im = Image.open(show / "sub" / "0_label.png")
    label = np.asarray(Image.open(tmp_path / "data" / "annotations" / "validation" / "sub" / "0.png"))
    assert im.mode == "P" and im.size == label.shape[::-1]  # at the label's (original) resolution
    assert im.getpalette()[:6] == [*class_colours(2)[0], *class_colours(2)[1]]  # the pictures' colours
    assert np.asarray(im).max() < len(SHAPE_CLASSES)
    title = json.loads(Image.open(show / "sub" / "0.png").text["title"])
    assert title == ["model denseclip_tiny | checkpoint official.pth | image sub/0.png"]
    with pytest.raises(SystemExit):
        evaluation.main([str(ckpt), *data])
    assert "--model is required" in capsys.readouterr().err


def test_distributed_eval_matches_one_process(model, tmp_path):
    """5 images on 2 ranks: shards of 3 and 2, nothing padded, so the summed confusion matrix is the same."""
    data = make_folder_dataset(tmp_path / "data", n_train=1, n_val=5)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    common = [str(ckpt), "--model", "denseclip_tiny", *data, "--crop-size", "64", "--workers", "0"]
    one = evaluation.main(common)
    torchrun("eval.py", [*common, "--out", str(tmp_path / "ddp.json")])
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    for k in ("aAcc", "mAcc", "mIoU"):
        assert ddp[k] == one[k], k


def test_config_overrides():
    assert config_overrides(["head_dropout=0", "test_mode=slide", "vision_layers=(1, 2)"]) == \
        {"head_dropout": 0, "test_mode": "slide", "vision_layers": (1, 2)}
    with pytest.raises(ConfigError, match="head_dropuot"):
        config_overrides(["head_dropuot=0"])


def test_class_colours_are_fixed():
    """Class k keeps its colour across runs and class counts (the label PNGs and pictures of two runs compare)."""
    assert class_colours(3) == ((31, 119, 180), (255, 127, 14), (44, 160, 44))
    assert class_colours(150)[:12] == class_colours(12)
