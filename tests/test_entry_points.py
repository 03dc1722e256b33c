"""Every entry point speaks the same way (issue 15, items 2b and 3): an expected problem ends with `error: <what,
where, what to do>` and exit status 2, never a traceback, before anything is built or written. Three catalogues:

    run options     impossible numbers (--lr nan, --iters 0, --workers -1, ...) refused by argparse, for every script
    entry points    bad names, --set, checkpoints and images, in demo.py, eval.py, train.py, tools/ and the pre-flight
    output folders  --out-dir / --show-dir / --out that cannot be written, names that would collide or climb out,
                    a run folder that holds another run

Each case runs the script's main as the command line does (errors.run_main, in-process: SystemExit carries the exit
status) and checks the status, that no traceback was printed, that the message names the culprit, and that the
working folder is unchanged (or, for the demo, that only its --out-dir gained files). A few run as real processes,
where the whole command line path matters."""
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402  (repo-root scripts)
import eval as evaluation  # noqa: E402
import train  # noqa: E402
from denseclip.data import preflight  # noqa: E402
from denseclip.data.coco import CocoDetection  # noqa: E402
from denseclip.errors import run_main  # noqa: E402
from denseclip.run.evaluate import image_name  # noqa: E402
from denseclip.run.outputs import inside  # noqa: E402

TINY = ["--crop-size", "32", "--batch-size", "2", "--val-size", "2", "--workers", "0", "--eval-interval", "0",
        "--set", "test_mode=whole"]
ENTRY_POINTS = ("train.py", "eval.py", "demo.py", "denseclip/data/preflight.py",
                *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").glob("*.py")))


def script(path: str):
    """The main of a script of the repository, by its path."""
    if path in ("train.py", "eval.py", "demo.py"):
        return {"train.py": train, "eval.py": evaluation, "demo.py": demo}[path].main
    if path == "denseclip/data/preflight.py":
        return preflight.main
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def ends(path: str, argv, capsys, cwd: Path):
    """Run the script as its command line does, in `cwd`: (exit status, stderr, files added or changed there)."""
    before = files(cwd)
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as info:
            run_main(lambda: script(path)(argv))
    finally:
        os.chdir(ROOT)
    after = files(cwd)
    return info.value.code, capsys.readouterr().err, sorted(k for k in after if after[k] != before.get(k))


def refused(path, argv, capsys, cwd, *words):
    """The script stops with status 2, prints `error:` naming every one of `words`, no traceback, writes nothing."""
    code, err, written = ends(path, argv, capsys, cwd)
    assert code == 2 and "error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert written == [], written
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 1-iteration denseclip_tiny checkpoint on procedural data, and a folder of photos (a readable one, a
    damaged one, one too small to segment)."""
    root = tmp_path_factory.mktemp("entry")
    train.main([*TINY, "--iters", "1", "--out-dir", str(root / "run")])
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photos / "good.jpg")
    (photos / "damaged.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(photos / "tiny.png")
    return root / "run" / "iter_000001.pt", photos


# ------------------------------------------------------------------------------------------- run options
@pytest.mark.parametrize("path,argv,words", [
    ("train.py", ["--lr", "nan"], ["--lr", "nan", "finite"]),
    ("train.py", ["--lr", "-1"], ["--lr", "-1", "above 0"]),
    ("train.py", ["--lr", "inf"], ["--lr", "finite"]),
    ("train.py", ["--epochs", "0"], ["--epochs", "at least 1"]),
    ("train.py", ["--iters", "0"], ["--iters", "at least 1"]),
    ("train.py", ["--iters", "2.5"], ["--iters", "'2.5' is not a whole number"]),
    ("train.py", ["--batch-size", "0"], ["--batch-size", "at least 1"]),
    ("train.py", ["--global-batch", "0"], ["--global-batch", "at least 1"]),
    ("train.py", ["--save-interval", "-1"], ["--save-interval", "at least 0"]),
    ("train.py", ["--eval-interval", "-5"], ["--eval-interval", "at least 0"]),
    ("train.py", ["--log-interval", "0"], ["--log-interval", "at least 1"]),
    ("train.py", ["--warmup-iters", "-1"], ["--warmup-iters"]),
    ("train.py", ["--workers", "-1"], ["--workers", "at least 0"]),
    ("train.py", ["--clip-grad", "nan"], ["--clip-grad", "finite"]),
    ("train.py", ["--clip-grad", "0"], ["--clip-grad", "above 0"]),
    ("train.py", ["--weight-decay", "nan"], ["--weight-decay"]),
    ("train.py", ["--min-lr", "-1e-6"], ["--min-lr"]),
    ("train.py", ["--backbone-lr-mult", "-0.1"], ["--backbone-lr-mult"]),
    ("train.py", ["--keep", "-1"], ["--keep"]),
    ("train.py", ["--seed", "-1"], ["--seed"]),
    ("train.py", ["--lr-steps", "8", "0"], ["--lr-steps"]),
    ("train.py", ["--crop-size", "0"], ["--crop-size", "at least 32"]),
    ("train.py", ["--scale", "512", "0"], ["--scale"]),
    ("train.py", ["--train-size", "0"], ["--train-size"]),
    ("train.py", ["--val-size", "-1"], ["--val-size"]),
    ("eval.py", ["CKPT", "--workers", "-1"], ["--workers"]),
    ("eval.py", ["CKPT", "--ratios", "1.0", "nan"], ["--ratios", "finite"]),
    ("eval.py", ["CKPT", "--score-map-images", "0"], ["--score-map-images"]),
    ("demo.py", ["CKPT", "x.jpg", "--scale", "0", "512"], ["--scale"]),
    ("denseclip/data/preflight.py", ["--batch-size", "0"], ["--batch-size"]),
    ("tools/export.py", ["CKPT", "--opset", "-1"], ["--opset"]),
    ("tools/random_clip.py", ["x.pt", "--seed", "nan"], ["--seed"]),
])
def test_impossible_numbers_are_refused_by_argparse(path, argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "build", None)  # would fail loudly if the run got that far
    err = refused(path, [*TINY, *argv] if path == "train.py" else argv, capsys, tmp_path, *words)
    assert f"error: argument {words[0]}" in err, err  # argparse's own line names the option


# ------------------------------------------------------------------------------------------- entry points
def test_every_entry_point_ends_in_run_main():
    for path in ENTRY_POINTS:
        assert (ROOT / path).read_text().rstrip().endswith('if __name__ == "__main__":\n    run_main(main)'), path


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    def pressed():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_main(pressed)
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C): stopped here; what was written so far stays\n"


def test_demo_classes_and_score_maps(ckpt, tmp_path, capsys):
    model, photos = ckpt
    base = [str(model), str(photos / "good.jpg"), "--out-dir", str(tmp_path / "out")]
    refused("demo.py", [*base, "--classes", ""], capsys, tmp_path, "--classes", "empty")
    refused("demo.py", [*base, "--classes", "disc,,box"], capsys, tmp_path, "--classes", "position [1]")
    refused("demo.py", [*base, "--score-maps", "disc,disc"], capsys, tmp_path, "--score-maps", "['disc']")
    long = "a very long class name that never fits in five tokens"
    refused("demo.py", [*base, "--classes", f"disc,{long}"], capsys, tmp_path, repr(long), "class_token_length")
    refused("demo.py", [*base, "--score-maps", long], capsys, tmp_path, repr(long))


@pytest.mark.parametrize("path", ["demo.py", "eval.py", "train.py", "tools/export.py"])
def test_bad_set_and_missing_or_empty_checkpoints(ckpt, tmp_path, capsys, path):
    model, photos = ckpt
    pictures = [str(photos / "good.jpg"), "--out-dir", str(tmp_path / "out")] if path == "demo.py" else []
    if path == "train.py":
        refused(path, [*TINY, "--set", "tua=0.07", "--out-dir", str(tmp_path / "run")], capsys, tmp_path, "tua=0.07",
                "FIELD=VALUE")
        refused(path, [*TINY, "--set", "tau=-1"], capsys, tmp_path, "tau=-1", "must be positive")
        refused(path, [*TINY, "--resume", str(tmp_path / "gone.pt")], capsys, tmp_path, "--resume", "gone.pt")
        return
    refused(path, [str(model), *pictures, "--set", "tau"], capsys, tmp_path, "--set 'tau'", "FIELD=VALUE")
    refused(path, [str(tmp_path / "gone.pt"), *pictures], capsys, tmp_path, "gone.pt", "no such file")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(path, [str(tmp_path / "empty.pt"), *pictures, "--model", "denseclip_tiny"], capsys, tmp_path,
            "empty.pt", "is empty")


def test_demo_skips_unreadable_images_and_lists_them_at_the_end(ckpt, tmp_path, capsys):
    model, photos = ckpt
    code, err, written = ends("demo.py", [str(model), str(photos), "--out-dir", "out"], capsys, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: skipped 2 of 3 image(s)") and "damaged.jpg" in err and "tiny.png" in err, err
    assert "30x20 pixels: under 32 on a side" in err, err
    assert written == ["out", "out/good.png", "out/good_label.png"]  # the readable one is drawn, nothing else


def test_other_entry_points_name_the_culprit(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "lo')
    refused("tools/plot_log.py", [str(tmp_path)], capsys, tmp_path, "log.jsonl, line 2", "not a JSON record")
    refused("tools/plot_log.py", [str(tmp_path / "nothing")], capsys, tmp_path, "nothing", "no such file")
    refused("denseclip/data/preflight.py", ["--dataset", "ade20k", "--data-root", str(tmp_path / "ade")], capsys,
            tmp_path, "ade")
    refused("eval.py", [str(tmp_path / "log.jsonl"), "--model", "denseclip_tiny"], capsys, tmp_path, "log.jsonl",
            "not a PyTorch checkpoint")


@pytest.mark.parametrize("path,argv,line", [
    ("demo.py", ["missing.pt", "x.jpg"], "error: x.jpg: no such file or folder"),
    ("tools/plot_log.py", ["runs/none"], "error: runs/none: no such file"),
])
def test_the_command_line_prints_one_error_line(tmp_path, path, argv, line):
    out = subprocess.run([sys.executable, str(ROOT / path), *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(line), out.stderr
    assert sorted(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- output folders
def can_write(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def unwritable(tmp_path: Path, monkeypatch) -> Path:
    """A folder this process cannot write in: a read-only one, or (as root, whom permission bits do not stop)
    sysfs, which refuses new files to everyone; where neither refuses, a folder whose write probe fails as a
    read-only mount's would."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if not can_write(folder):
        return folder
    folder.chmod(0o755)
    if Path("/sys").is_dir() and not can_write(Path("/sys")):
        return Path("/sys")
    real = tempfile.TemporaryFile

    def probe_refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", probe_refused)
    return folder


@pytest.mark.parametrize("path,option", [("train.py", "--out-dir"), ("eval.py", "--show-dir"),
                                         ("demo.py", "--out-dir")])
def test_an_output_folder_that_is_a_file_or_unwritable_fails_before_any_work(ckpt, tmp_path, capsys, monkeypatch,
                                                                            path, option):
    model, photos = ckpt
    for name in ("build", "load_checkpoint"):  # none of it may run: the check comes first
        for module in (train, evaluation, demo):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, None)
    head = {"train.py": TINY, "eval.py": [str(model)], "demo.py": [str(model), str(photos)]}[path]
    (tmp_path / "taken").write_text("a file")
    refused(path, [*head, option, str(tmp_path / "taken")], capsys, tmp_path, option, "taken", "is a file")
    refused(path, [*head, option, str(tmp_path / "taken" / "sub")], capsys, tmp_path, "inside", "which is a file")
    locked = unwritable(tmp_path, monkeypatch)
    refused(path, [*head, option, str(locked / "out")], capsys, tmp_path, option, f"cannot write in {locked}")
    assert not (locked / "out").exists()


def test_eval_out_in_a_missing_folder_or_over_the_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    model, _ = ckpt
    monkeypatch.setattr(evaluation, "load_checkpoint", None)
    refused("eval.py", [str(model), "--out", str(tmp_path / "no" / "m.json")], capsys, tmp_path, "--out",
            "the folder", "does not exist", "mkdir -p")
    refused("eval.py", [str(model), "--out", str(tmp_path)], capsys, tmp_path, "is a folder")
    before = model.read_bytes()
    refused("eval.py", [str(model), "--out", str(model)], capsys, tmp_path, "would overwrite the input")
    assert model.read_bytes() == before


def test_demo_refuses_colliding_names_and_overwriting_an_input(ckpt, tmp_path, capsys, monkeypatch):
    model, photos = ckpt
    monkeypatch.setattr(demo, "load_model", None)
    other = tmp_path / "other"
    other.mkdir()
    Image.open(photos / "good.jpg").save(other / "good.jpg")
    refused("demo.py", [str(model), str(photos / "good.jpg"), str(other / "good.jpg"), "--out-dir", "out"], capsys,
            tmp_path, "good.jpg", "out/good.png", "both")
    Image.open(photos / "good.jpg").save(other / "good.png")
    refused("demo.py", [str(model), str(other), "--out-dir", str(other)], capsys, tmp_path, "good.png",
            "would replace an input image")


def test_train_refuses_a_folder_that_holds_another_run(ckpt, tmp_path, capsys):
    model, _ = ckpt
    run = model.parent
    err = refused("train.py", [*TINY, "--iters", "1", "--out-dir", str(run)], capsys, tmp_path, str(run),
                  "iter_000001.pt", "log.jsonl", "--resume auto", "another --out-dir")
    assert err.count("\n") == 1, err  # one line
    (tmp_path / "log-only").mkdir()
    (tmp_path / "log-only" / "log.jsonl").write_text('{"iter": 3000, "loss": 0.1}\n')
    refused("train.py", [*TINY, "--out-dir", str(tmp_path / "log-only")], capsys, tmp_path, "log.jsonl")


def test_a_resumed_run_drops_the_log_records_it_does_again(tmp_path):
    """After a SIGKILL the log runs ahead of the last checkpoint: --resume auto drops those records, so that the
    curves never run back."""
    out = tmp_path / "run"
    train.main([*TINY, "--iters", "1", "--log-interval", "1", "--out-dir", str(out)])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 2, "loss": 9.0}\n{"iter": 3, "loss": 9.0}\n')  # steps the killed run did after iter 1
    train.main([*TINY, "--iters", "2", "--log-interval", "1", "--out-dir", str(out), "--resume", "auto"])
    iters = [int(line.split('"iter": ')[1].split(",")[0]) for line in (out / "log.jsonl").read_text().splitlines()]
    assert iters == sorted(iters) and iters.count(2) == 2 and 3 not in iters  # train + val records of step 2


@pytest.mark.parametrize("name,kept", [("../../etc/x.jpg", "etc/x.jpg"), ("/abs/a.png", "abs/a.png"),
                                       ("sub/./b.jpg", "sub/b.jpg"), ("c.jpg", "c.jpg")])
def test_picture_names_from_data_stay_inside_the_show_dir(name, kept):
    assert inside(name) == kept
    coco = CocoDetection.__new__(CocoDetection)  # only what image_name reads: the json's file_name of each image
    coco.coco, coco.ids = type("C", (), {"imgs": {7: {"file_name": name}}})(), [7]
    assert image_name(coco, 0) == str(Path(kept).with_suffix(".png"))
    assert not Path(image_name(coco, 0)).is_absolute() and ".." not in Path(image_name(coco, 0)).parts
