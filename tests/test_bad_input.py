"""Bad input fails early and clearly: a catalogue of damaged data, wrong arguments, unusable checkpoints and runtime
failures. Each case checks the error type, that the message names the offending file or argument, and that nothing
was written (no run folder) or lost (existing checkpoints unchanged). The inputs that must work (grey, palette,
16-bit, RGBA, EXIF-rotated images) check the exact pixels that come out, against OpenCV's IMREAD_COLOR (mmseg's
loader) when it is installed."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluation  # noqa: E402  (repo-root scripts)
import train  # noqa: E402
from denseclip.data import preflight  # noqa: E402
from denseclip.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from denseclip.data.image_io import read_image, read_label  # noqa: E402
from denseclip.errors import ConfigError, DataError, MissingFileError, TrainingError  # noqa: E402
from denseclip import build_model  # noqa: E402
from denseclip.language import drop_text_encoder  # noqa: E402
from denseclip.segmentor import DenseCLIP  # noqa: E402

NAMES = "sky,tree,road,car"
TINY = ["--crop-size", "32", "--batch-size", "2", "--log-interval", "1", "--eval-interval", "0", "--workers", "0",
        "--scale", "48", "32", "--set", "test_mode=whole"]


def write_pair(root: Path, split: str, stem: str, size=(32, 24), rng=None, label=None):
    """One JPEG image and its grey PNG label (values 0..3), size (w, h)."""
    rng = rng or np.random.default_rng(len(stem))
    w, h = size
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{stem}.jpg")
    label = rng.integers(0, 4, (h, w), dtype=np.uint8) if label is None else label
    Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture
def data(tmp_path):
    """(root, data options): 4 training and 2 validation pairs of a folder dataset with 4 classes."""
    root = tmp_path / "data"
    for i in range(4):
        write_pair(root, "training", f"t{i}")
    for i in range(2):
        write_pair(root, "validation", f"v{i}")
    return root, ["--dataset", "folder", "--data-root", str(root), "--class-names", NAMES]


def refused(exc_type, argv, *names, script=train):
    """Run a script's main, expect exc_type with every one of `names` in the message; return the message."""
    with pytest.raises(exc_type) as info:
        script.main(argv)
    msg = str(info.value)
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def train_refused(tmp_path, exc_type, argv, *names):
    out = tmp_path / "run"
    msg = refused(exc_type, [*TINY, *argv, "--out-dir", str(out)], *names)
    assert not out.exists()  # nothing written
    return msg


# ------------------------------------------------------------------------------------------------- data
def test_image_without_label_label_without_image_and_other_extension_are_reported_together(data, tmp_path):
    root, opts = data
    (root / "annotations/training/t1.png").unlink()  # image without a label
    (root / "images/training/t2.jpg").unlink()  # label without an image
    Image.new("RGB", (32, 24)).save(root / "images/training/t2.png")  # ... the image has another extension
    Image.new("RGB", (32, 24)).save(root / "images/training/x.JPG")
    msg = train_refused(tmp_path, DataError, opts, "t1.jpg", "t2.png", "x.JPG", "--img-suffix .jpg",
                        "label(s) without an image", "nothing was trained")
    assert "1 train image(s) without a label" in msg and "2 train image(s) with another extension" in msg


def test_many_offenders_are_counted_and_the_first_few_named(data, tmp_path):
    root, opts = data
    for i in range(9):
        Image.new("RGB", (32, 24)).save(root / "images/training" / f"orphan{i}.jpg")
    msg = train_refused(tmp_path, DataError, opts, "9 train image(s) without a label", "orphan0.jpg", "orphan4.jpg",
                        "and 4 more")
    assert "orphan5.jpg" not in msg


def test_size_mismatch_is_read_from_headers(data, tmp_path):
    root, opts = data
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "annotations/training/t3.png")
    train_refused(tmp_path, DataError, opts, "t3.jpg is 32x24", "t3.png is 40x30", "size mismatch")


def test_exif_rotated_image_with_a_label_of_the_stored_size_is_a_size_error(data, tmp_path):
    root, opts = data
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32x24, shown (and loaded) upright as 24x32; the label stays 32x24
    Image.new("RGB", (32, 24)).save(root / "images/validation/v0.jpg", exif=exif.tobytes())
    train_refused(tmp_path, DataError, opts, "v0.jpg is 24x32 (upright)", "v0.png is 32x24")


def test_colour_label_is_refused(data, tmp_path):
    root, opts = data
    Image.new("RGB", (32, 24)).save(root / "annotations/training/t0.png")
    train_refused(tmp_path, DataError, opts, "t0.png: mode RGB", "not single-channel")


def test_unreadable_image_is_named(data, tmp_path):
    root, opts = data
    (root / "images/training/t2.jpg").write_bytes(b"not a jpeg")
    train_refused(tmp_path, DataError, opts, "t2.jpg", "unreadable image")


def test_validation_label_values_are_checked_before_training(data, tmp_path):
    root, opts = data
    Image.fromarray(np.full((24, 32), 7, np.uint8)).save(root / "annotations/validation/v1.png")
    train_refused(tmp_path, DataError, opts, "v1.png", "[7]", "outside 0..3", "--reduce-zero-label")


def test_training_label_values_and_corrupt_images_need_the_full_check(data, tmp_path):
    root, opts = data
    Image.fromarray(np.full((24, 32), 9, np.uint8)).save(root / "annotations/training/t0.png")
    jpg = root / "images/training/t1.jpg"
    raw = jpg.read_bytes()
    jpg.write_bytes(raw[: raw.index(b"\xff\xda") + 20])  # cut 20 bytes into the pixels: the header survives
    assert "OK" in preflight.main(opts[:-2] + ["--class-names", NAMES, "--check-data", "quick"])
    msg = train_refused(tmp_path, DataError, [*opts, "--check-data", "full"], "t0.png", "[9]", "t1.jpg",
                        "corrupt image")
    # the standalone command decodes everything by default and reports the same files
    assert str(refused(DataError, opts, "t0.png", "t1.jpg", script=preflight)).count("\n") == msg.count("\n")


def test_too_few_samples_for_a_micro_batch(data, tmp_path):
    _, opts = data
    train_refused(tmp_path, DataError, [*opts, "--batch-size", "8"], "4 pairs make no micro-batch of 8",
                  "--batch-size")


def test_missing_data_root(tmp_path):
    train_refused(tmp_path, DataError, ["--dataset", "ade20k", "--data-root", str(tmp_path / "nowhere")],
                  str(tmp_path / "nowhere" / "images" / "training"), "data/README.md")


# -------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("setting,field", [("test_mode=slde", "test_mode"), ("backbone=vitt", "backbone"),
                                           ("prompting=context", "prompting"), ("head_dropout=abc", "head_dropout"),
                                           ("head_dropout=1.5", "head_dropout"), ("test_stride=500", "test_stride")])
def test_config_values_are_checked(tmp_path, setting, field):
    train_refused(tmp_path, ConfigError, ["--set", setting], f"{field}=", "--set")


def test_prompting_without_text_is_refused():
    with pytest.raises(ConfigError, match="prompting='post'.*use_text=False"):
        build_model("fpn_tiny", ["a", "b"], prompting="post")


def test_unknown_config_field(tmp_path):
    train_refused(tmp_path, ConfigError, ["--set", "head_droput=0"], "head_droput", "head_dropout")


def test_class_names_file_that_does_not_exist(data, tmp_path):
    root, opts = data
    train_refused(tmp_path, MissingFileError, [*opts[:-2], "--class-names", "data/names.txt"], "data/names.txt",
                  "no such file")


@pytest.mark.parametrize("names,shown", [("sky,,road", "position [1]"), ("sky,tree,sky", "['sky']")])
def test_empty_or_duplicate_class_names(data, tmp_path, names, shown):
    _, opts = data
    train_refused(tmp_path, ConfigError, [*opts[:-2], "--class-names", names], shown)
    with pytest.raises(ConfigError, match="class name"):
        build_model("denseclip_tiny", names.split(","))


def test_class_name_over_the_token_budget_is_a_config_error(data, tmp_path):
    _, opts = data
    train_refused(tmp_path, ConfigError, [*opts[:-2], "--class-names", "sky,tree,road,a rhombicosidodecahedron"],
                  "'a rhombicosidodecahedron' needs 12 tokens", "more than class_token_length 5",
                  "--set class_token_length=12")
    build_model("denseclip_tiny", ["sky", "a rhombicosidodecahedron"], class_token_length=12)  # the fix works


def test_device_cuda_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, wherever this runs
    train_refused(tmp_path, ConfigError, ["--device", "cuda"], "--device cuda", "--device cpu")


@pytest.mark.parametrize("argv,names", [
    (["--global-batch", "3"], ["--global-batch 3", "--batch-size 2"]),
    (["--amp", "fp16", "--device", "cpu"], ["--amp fp16", "bf16"]),
    (["--model", "denseclip_vitb16", "--crop-size", "100"], ["--crop-size 100", "patch size 16"]),
])
def test_run_options(tmp_path, argv, names):
    train_refused(tmp_path, ConfigError, argv, *names)


def test_vit_input_is_padded_at_test_time_and_refused_in_training():
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", ["sky", "tree"], backbone="vit", vision_layers=4, vision_width=32,
                        vision_heads=2, input_resolution=64, score_concat_index=2, vit_out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        out = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 8, 0, 8)))  # the next multiple of 16, zeros bottom/right
    assert out.shape == (1, 2, 40, 56)
    assert torch.equal(out, torch.nn.functional.interpolate(padded, size=(48, 64), mode="bilinear")[..., :40, :56])
    with pytest.raises(ConfigError, match="40x56.*--crop-size"):
        model.train()(x, torch.zeros(1, 40, 56, dtype=torch.long))


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-iteration train.py checkpoint of denseclip_tiny on procedural data."""
    out = tmp_path_factory.mktemp("trained")
    train.main([*TINY, "--iters", "1", "--val-size", "2", "--out-dir", str(out)])
    return out / "iter_000001.pt"


def test_missing_resume_and_pretrained_files(tmp_path):
    train_refused(tmp_path, MissingFileError, ["--resume", str(tmp_path / "gone.pt")], "--resume", "gone.pt")
    train_refused(tmp_path, MissingFileError, ["--pretrained", "pretrained/RN5O.pt"], "--pretrained",
                  "pretrained/RN5O.pt")
    refused(MissingFileError, [str(tmp_path / "gone.pt")], "gone.pt", script=evaluation)


def damaged(kind, path: Path, good: Path):
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "jpeg":
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    elif kind == "unsafe":  # a numpy scalar in the metadata: the safe loader refuses the whole file
        torch.save({"state_dict": torch.load(good, weights_only=True)["model"], "meta": {"iou": np.float64(0.5)}},
                   path)


@pytest.mark.parametrize("kind,words", [("truncated", ["truncated or damaged", "copy or download it again"]),
                                        ("empty", ["is empty"]),
                                        ("jpeg", ["not a PyTorch checkpoint"]),
                                        ("unsafe", ["refused by the safe loader", "numpy", "weights_only=False",
                                                    "If you trust the file"])])
def test_unusable_checkpoint_files(trained, tmp_path, kind, words):
    path = tmp_path / f"{kind}.pth"
    damaged(kind, path, trained)
    before = path.read_bytes()
    refused(CheckpointError, [str(path), "--model", "denseclip_tiny", "--val-size", "2", "--workers", "0"],
            str(path), *words, script=evaluation)
    with pytest.raises(CheckpointError, match=kind):
        load_checkpoint(build_model("denseclip_tiny", ["a"]), str(path))
    assert path.read_bytes() == before  # nothing lost


def test_checkpoint_of_another_architecture_names_its_config(trained):
    refused(CheckpointError, [str(trained), "--model", "fpn_tiny", "--workers", "0"], "another architecture",
            "trained with --model denseclip_tiny", script=evaluation)


def test_resume_of_another_model_or_of_weights_only(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained, out)
    before = (out / trained.name).read_bytes()
    refused(ConfigError, [*TINY, "--model", "fpn_tiny", "--resume", "auto", "--iters", "2", "--out-dir", str(out)],
            "trained with --model denseclip_tiny", "--model fpn_tiny")
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": torch.load(trained, weights_only=True)["model"]}, weights)
    refused(ConfigError, [*TINY, "--resume", str(weights), "--out-dir", str(out)], "weights.pth", "--pretrained")
    assert sorted(p.name for p in out.iterdir()) == [trained.name] and (out / trained.name).read_bytes() == before


def test_text_free_export_keeps_its_class_names(tmp_path):
    torch.manual_seed(0)
    model = drop_text_encoder(build_model("denseclip_tiny", ["sky", "tree"]).eval())
    torch.save({"model": model.state_dict()}, tmp_path / "export.pth")
    load_checkpoint(build_model("denseclip_tiny", ["sky", "tree"]), str(tmp_path / "export.pth"))
    with pytest.raises(CheckpointError, match=r"made for the classes \['sky', 'tree'\].*\['sky', 'road'\]"):
        load_checkpoint(build_model("denseclip_tiny", ["sky", "road"]), str(tmp_path / "export.pth"))


# ----------------------------------------------------------------------------------------------- runtime
def test_non_finite_loss_stops_with_the_iteration_and_terms_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    forward, calls = DenseCLIP.forward, []

    def nan_at_third_step(self, images, labels=None):
        out = forward(self, images, labels)
        if labels is not None:
            calls.append(1)
            if len(calls) == 3:
                out["loss_aux"] = out["loss_aux"] * float("nan")
        return out

    monkeypatch.setattr(DenseCLIP, "forward", nan_at_third_step)
    out = tmp_path / "run"
    refused(TrainingError, [*TINY, "--iters", "5", "--save-interval", "2", "--out-dir", str(out)],
            "iteration 3", "loss_decode", "loss_aux nan", "the step's images and targets are all finite",
            "iter_000002.pt is the last good checkpoint")
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_000002.pt"]


def test_keep_last_n_checkpoints(tmp_path):
    out = tmp_path / "run"
    train.main([*TINY, "--iters", "4", "--save-interval", "1", "--keep", "2", "--val-size", "2", "--out-dir",
                str(out)])
    assert sorted(p.name for p in out.glob("iter_*")) == ["iter_000003.pt", "iter_000004.pt"]


def test_predict_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", ["sky", "tree"])
    x = torch.randn(2, 3, 64, 64)
    model.train()
    a = model.predict(x, mode="whole")
    assert model.training  # restored
    b = model.eval().predict(x, mode="whole")
    assert torch.equal(a, b)  # dropout off and BatchNorm running statistics in both


def test_eval_says_which_options_came_from_the_checkpoint(trained, capsys):
    evaluation.main([str(trained), "--workers", "0"])
    out = capsys.readouterr().out
    assert "options taken from the checkpoint:" in out and "--val-size 2" in out and "--crop-size 32" in out
    assert "PARTIAL evaluation, the first 2 validation images" in out


# ----------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("script,argv,words", [
    ("train.py", ["--resume", "missing.pt"], ["--resume missing.pt: no such checkpoint"]),
    ("eval.py", ["missing.pt"], ["checkpoint missing.pt: no such file"]),
])
def test_command_line_prints_the_message_and_exits_2_without_traceback(tmp_path, script, argv, words):
    out = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and all(w in out.stderr for w in words), out.stderr
    assert sorted(tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------------- inputs that work
def cv2_colour(path):
    import cv2  # opencv-python-headless: in the dev extra

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_grey_palette_16bit_and_rgba_images_read_as_opencv_does(tmp_path):
    grey = np.array([[0, 7, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    pal.save(tmp_path / "palette.png")
    Image.fromarray(np.array([[0, 255, 256, 511, 32768, 65535]], np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], np.uint8)).save(tmp_path / "rgba.png")
    want = {"grey": [[[0] * 3, [7] * 3, [255] * 3]],
            "palette": [[[10, 20, 30], [40, 50, 60], [70, 80, 90]]],
            "grey16": [[[v] * 3 for v in (0, 0, 1, 1, 128, 255)]],  # the high byte, as OpenCV's 8-bit read
            "rgba": [[[10, 20, 30], [200, 100, 50]]]}  # alpha dropped, not blended
    for name, pixels in want.items():
        got = read_image(tmp_path / f"{name}.png")
        assert got.dtype == np.uint8 and got.tolist() == pixels, name
        assert np.array_equal(got, cv2_colour(tmp_path / f"{name}.png")), name


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1)), (5, lambda a: np.rot90(a, 1)[::-1]),
                                              (7, lambda a: np.rot90(a, -1)[::-1])])
def test_exif_rotated_jpeg_is_turned_upright_as_opencv_does(tmp_path, orientation, turn):
    img = np.zeros((16, 32, 3), np.uint8)  # four flat 8x8-aligned quadrants: JPEG keeps them exactly
    img[:8, :16], img[:8, 16:], img[8:, :16], img[8:, 16:] = [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(tmp_path / "plain.jpg", quality=100, subsampling=0)
    Image.fromarray(img).save(tmp_path / "turned.jpg", quality=100, subsampling=0, exif=exif.tobytes())
    plain = read_image(tmp_path / "plain.jpg")
    assert np.abs(plain.astype(int) - img).max() <= 1  # JPEG rounding only
    got = read_image(tmp_path / "turned.jpg")
    assert np.array_equal(got, turn(plain))
    assert np.array_equal(got, cv2_colour(tmp_path / "turned.jpg"))


def test_labels_are_read_as_stored(tmp_path):
    pal = Image.fromarray(np.array([[0, 3], [255, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0] * 256)
    pal.save(tmp_path / "palette.png")
    assert read_label(tmp_path / "palette.png", False, 4).tolist() == [[0, 3], [255, 1]]
    Image.fromarray(np.array([[1, 3]], np.uint16)).save(tmp_path / "l16.png")
    assert read_label(tmp_path / "l16.png", True, 4).tolist() == [[0, 2]]
