"""Weights that travel (tools/export.py, hubconf.py) on a tiny model trained for one step: the safetensors file
loads without pickle into the same outputs as the .pt, demo.py and eval.py take it as their checkpoint (config,
overrides and class names from its json, or from its header alone), the ONNX file gives PyTorch's logits within 1e-4
at sizes it was not traced at, torch.hub builds and loads a named config from this folder, a text-free export
refuses new class names, and a missing package says how to install it."""
import contextlib
import importlib.util
import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from denseclip import CONFIGS, build_model, load_checkpoint
from denseclip.checkpoint import CheckpointError
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES
from denseclip.errors import MissingPackageError
from denseclip.run.checkpoints import saved_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402

spec = importlib.util.spec_from_file_location("export", ROOT / "tools" / "export.py")
export = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export)

OVERRIDES = ["neck_channels=16"]  # the default config's weights would not fit: the overrides must travel too
TRAIN = ["--iters", "1", "--batch-size", "2", "--global-batch", "2", "--crop-size", "64", "--val-size", "2",
         "--eval-interval", "0", "--workers", "0", "--set", OVERRIDES[0]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train.py's checkpoint after one step, its classifier scaled so that the logits have a trained model's size
    (about 10; at initialisation they are about 0.01 and any tolerance would pass), then exported to tiny.*."""
    tmp = tmp_path_factory.mktemp("export")
    train.main([*TRAIN, "--out-dir", str(tmp / "run")])
    ckpt = tmp / "run" / "iter_000001.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"]["decode_head.conv_seg.weight"] *= 1000
    torch.save(state, ckpt)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main([str(ckpt), "--out", str(tmp / "tiny")])
    image = tmp / "shapes.png"
    Image.fromarray(ProceduralShapes("val", size=64).raw(3)[0]).save(image)
    return ckpt, tmp / "tiny", image, printed.getvalue()


def from_pt(ckpt):
    model = build_model("denseclip_tiny", SHAPE_CLASSES, neck_channels=16)
    load_checkpoint(model, str(ckpt))
    return model.eval()


def images(*sizes):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, H, W, generator=g) for H, W in sizes]


def no_pickle(*args, **kwargs):
    raise AssertionError("pickle was used")


def test_safetensors_round_trip_loads_without_pickle_into_the_same_outputs(run, monkeypatch):
    ckpt, out, _, _ = run
    reference = from_pt(ckpt)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, neck_channels=16)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    report = load_checkpoint(model, str(out.with_suffix(".safetensors")))
    monkeypatch.undo()
    assert report.kind == "model" and not report.missing
    model.eval()
    for x in images((64, 64), (48, 80)):
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model.score_logits(x, ["disc", "box"]), reference.score_logits(x, ["disc", "box"]))
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["format"], info["version"], info["model"], info["overrides"], info["class_names"]) == (
        "denseclip-export", 1, "denseclip_tiny", OVERRIDES, list(SHAPE_CLASSES))
    assert info["data"]["dataset"] == "procedural" and info["data"]["crop_size"] == 64
    alone = out.parent / "alone" / "tiny.safetensors"  # without the json: the copy in the header answers
    alone.parent.mkdir()
    shutil.copy(out.with_suffix(".safetensors"), alone)
    assert saved_run(str(alone)) == saved_run(str(out.with_suffix(".safetensors")))
    assert saved_run(str(alone))["args"]["overrides"] == OVERRIDES


def test_demo_and_eval_take_the_export_as_their_checkpoint(run):
    ckpt, out, image, _ = run
    labels = []
    for i, path in enumerate((ckpt, out.with_suffix(".safetensors"))):
        demo.main([str(path), str(image), "--out-dir", str(out.parent / f"demo{i}")])  # no --model: from the json
        labels.append(np.asarray(Image.open(out.parent / f"demo{i}" / "shapes_label.png")))
    assert np.array_equal(*labels)
    results = [evaluation.main([str(path), "--workers", "0"]) for path in (ckpt, out.with_suffix(".safetensors"))]
    assert results[0]["mIoU"] == results[1]["mIoU"] and results[0]["aAcc"] == results[1]["aAcc"]


def test_onnx_gives_pytorch_logits_within_1e_4_on_two_sizes(run):
    ckpt, out, _, printed = run
    assert "onnxruntime vs PyTorch" in printed and "128x128" in printed and "72x152" in printed
    reference = from_pt(ckpt)
    session = onnxruntime.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    for x in images((64, 64), (100, 75), (2 * 80, 96)):  # none is the traced 96 x 160; two are no multiple of 32
        with torch.no_grad():
            expected = reference(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == expected.shape == (1, len(SHAPE_CLASSES), *x.shape[-2:])
        assert np.abs(expected).max() > 1  # logits of a trained model's size: the tolerance means something
        assert np.abs(got - expected).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out.with_suffix(".onnx")), load_external_data=False).metadata_props}
    assert json.loads(meta["class_names"]) == list(SHAPE_CLASSES)
    assert json.loads(meta["mean"]) == [0.48145466, 0.4578275, 0.40821073]


def test_torch_hub_builds_a_named_config_and_loads_weights(run, monkeypatch):
    ckpt, out, _, _ = run
    x = images((64, 64))[0]
    reference = from_pt(ckpt)(x)
    for weights in (out.with_suffix(".safetensors"), ckpt):
        model = torch.hub.load(str(ROOT), "denseclip_tiny", source="local", weights=str(weights))
        assert not model.training and torch.equal(model(x), reference)
    fresh = torch.hub.load(str(ROOT), "denseclip_tiny", source="local", class_names=["sky", "tree"], head_channels=8)
    assert fresh.class_names == ["sky", "tree"] and fresh.cfg.head_channels == 8
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))  # no download
    assert torch.hub.list("any/repo") == sorted(CONFIGS)


def test_text_free_export_refuses_new_class_names(run):
    ckpt, out, image, _ = run
    free = out.parent / "free"
    export.main([str(ckpt), "--out", str(free), "--text-free", "--formats", "safetensors"])
    path = str(free.with_suffix(".safetensors"))
    assert json.loads(free.with_suffix(".json").read_text())["text_free"] is True
    assert free.with_suffix(".safetensors").stat().st_size < out.with_suffix(".safetensors").stat().st_size / 2
    demo.main([path, str(image), "--out-dir", str(out.parent / "demo_free")])
    demo.main([str(ckpt), str(image), "--out-dir", str(out.parent / "demo_pt")])
    assert np.array_equal(np.asarray(Image.open(out.parent / "demo_free" / "shapes_label.png")),
                          np.asarray(Image.open(out.parent / "demo_pt" / "shapes_label.png")))
    with pytest.raises(ValueError, match="no text encoder"):
        demo.main([path, str(image), "--out-dir", str(out.parent / "x"), "--classes", "kettle,sky"])
    with pytest.raises(CheckpointError, match="build the model with the export's class names"):
        load_checkpoint(build_model("denseclip_tiny", ["kettle", "sky"], neck_channels=16), path)


def test_a_missing_package_says_how_to_install_it(run, monkeypatch):
    ckpt, out, _, _ = run
    monkeypatch.setitem(sys.modules, "safetensors", None)
    model = build_model("denseclip_tiny", SHAPE_CLASSES, neck_channels=16)
    with pytest.raises(MissingPackageError, match=r'pip install safetensors \(or pip install -e "\.\[export\]"'):
        load_checkpoint(model, str(out.with_suffix(".safetensors")))
    with pytest.raises(MissingPackageError, match="pip install safetensors"):
        export.main([str(ckpt), "--out", str(out.parent / "none"), "--formats", "safetensors"])


def test_a_detector_travels_as_safetensors_only(tmp_path):
    names = list(SHAPE_CLASSES[1:])
    torch.manual_seed(0)
    model = build_model("retinanet_denseclip_tiny", names).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "det.pth")  # an official-style file: --model needed
    argv = [str(tmp_path / "det.pth"), "--model", "retinanet_denseclip_tiny", "--class-names", ",".join(names)]
    export.main(argv)
    assert not (tmp_path / "det.onnx").exists()
    loaded = build_model("retinanet_denseclip_tiny", names)
    load_checkpoint(loaded, str(tmp_path / "det.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="the ONNX export is for segmentors"):
        export.main([*argv, "--formats", "onnx"])


def test_the_export_keeps_every_option_eval_takes_from_a_checkpoint():
    assert set(export.DATA_KEYS) == evaluation.INHERIT - {"model", "overrides", "class_names", "seed"}
