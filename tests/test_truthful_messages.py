"""Messages that tell the truth (issue 15, item 6): an option eval.py took from the checkpoint is named as taken from
it, not as if the user had passed it; a TorchScript look-alike is refused without suggesting weights_only=False; a
repeated category name is said to come from the json's categories."""
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import NAMES, TINY, write_pair  # noqa: E402
from test_coco import make_coco_dataset  # noqa: E402

import eval as evaluation  # noqa: E402  (repo root: on sys.path through test_bad_input)
import train  # noqa: E402
from denseclip import build_model  # noqa: E402
from denseclip.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from denseclip.errors import ConfigError, DataError, UserError  # noqa: E402


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """(data root, checkpoint) of a 1-iteration run on a folder dataset: the checkpoint remembers --data-root."""
    tmp = tmp_path_factory.mktemp("folder")
    root, rng = tmp / "data", np.random.default_rng(0)
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            write_pair(root, split, f"{split[0]}{i}", rng=rng)
    train.main([*TINY, "--dataset", "folder", "--data-root", str(root), "--class-names", NAMES, "--iters", "1",
                "--global-batch", "2", "--out-dir", str(tmp / "run")])
    return root, tmp / "run" / "iter_000001.pt"


def eval_refused(exc_type, argv):
    with pytest.raises(exc_type) as info:
        evaluation.main([*argv, "--workers", "0"])
    return str(info.value)


def test_an_option_from_the_checkpoint_is_named_as_inherited(folder_run, tmp_path):
    root, ckpt = folder_run
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)  # the data moved after training (another machine, another mount)
    try:
        msg = eval_refused(UserError, [str(ckpt)])
        assert str(root) in msg, msg
        note = msg.splitlines()[-1]  # every option the message names that came from the checkpoint, with its value
        assert note.startswith("(") and f"--data-root {root}" in note and "--dataset" not in note, note
        assert f": taken from {ckpt}, not given on the command line; pass " in note and "--data-root" in note, note
        evaluation.main([str(ckpt), "--data-root", str(moved), "--workers", "0"])  # given: no note, and it works
    finally:
        shutil.move(moved, root)


def test_an_inherited_override_is_named_as_inherited(folder_run, tmp_path):
    _, ckpt = folder_run
    saved = torch.load(ckpt, weights_only=True)
    saved["args"]["overrides"] = ["test_mode=whole", "no_such_field=1"]  # written by a version with that field
    torch.save(saved, tmp_path / "old.pt")
    msg = eval_refused(ConfigError, [str(tmp_path / "old.pt")])
    assert "--set 'no_such_field=1'" in msg and "--set test_mode=whole --set no_such_field=1: taken from" in msg, msg
    # --set on the command line adds to the file's overrides: the file's bad one is still the file's
    msg = eval_refused(ConfigError, [str(tmp_path / "old.pt"), "--set", "test_stride=16"])
    assert "--set 'no_such_field=1'" in msg and "--set test_mode=whole --set no_such_field=1: taken from" in msg, msg
    msg = eval_refused(ConfigError, [str(ckpt), "--set", "bad"])  # the user's own: said as the user's
    assert msg.startswith("--set 'bad'") and "(--set test_mode=whole: taken from" in msg, msg


def look_alike(path: Path):
    """A torch.save zip with a Python object the safe loader refuses, dressed up with a TorchScript constants.pkl."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": np.float64(1)}, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{path.stem}/constants.pkl", b"\x80\x02]q\x00.")


def test_a_torchscript_look_alike_is_refused_without_weights_only_false(tmp_path):
    path = tmp_path / "RN50.pt"
    look_alike(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("denseclip_tiny", ["a"]), str(path))
    msg = str(info.value)
    assert "looks like a TorchScript archive" in msg and str(path) in msg and "weights_only" not in msg, msg
    msg = eval_refused(CheckpointError, [str(path), "--model", "denseclip_tiny"])
    assert "looks like a TorchScript archive" in msg and "weights_only" not in msg, msg
    with pytest.raises(CheckpointError) as info:
        train.main([*TINY, "--iters", "1", "--resume", str(path), "--out-dir", str(tmp_path / "run")])
    msg = str(info.value)
    assert "is a TorchScript archive" in msg and "--pretrained" in msg and "weights_only" not in msg, msg
    assert not (tmp_path / "run").exists()


def test_a_repeated_category_name_names_the_json(tmp_path, monkeypatch):
    root = tmp_path / "data"
    opts = make_coco_dataset(root)
    d = json.loads((root / "train.json").read_text())
    d["categories"][1]["name"] = d["categories"][0]["name"] + " "  # the same name once spaces are stripped
    (root / "train.json").write_text(json.dumps(d))
    ids = ", ".join(str(c["id"]) for c in sorted(d["categories"][:2], key=lambda c: c["id"]))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(DataError) as info:
        train.main(["--model", "retinanet_tiny", "--batch-size", "2", "--iters", "1", "--workers", "0", *opts,
                    "--out-dir", str(tmp_path / "run")])
    msg = str(info.value)
    name = d["categories"][0]["name"]
    assert f"{root / 'train.json'}: the json's categories repeat the name(s) {name!r} (ids {ids})" in msg, msg
    assert "val.json" not in msg and not (tmp_path / "run").exists(), msg
