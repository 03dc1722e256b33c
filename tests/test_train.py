"""train.py: the optimiser rules, a CPU smoke run of the real main(), bit-exact resume, DDP == one process."""
import json
import os
import shutil
import socket
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
from denseclip.run import optim  # noqa: E402
from denseclip.data.procedural import SHAPE_CLASSES, render_shapes  # noqa: E402
from denseclip.errors import ConfigError, DataError  # noqa: E402
from denseclip import build_model  # noqa: E402

TINY = ["--crop-size", "64", "--batch-size", "2", "--log-interval", "1", "--eval-interval", "0", "--workers", "0",
        "--val-size", "8"]
NO_DROPOUT = ["--set", "head_dropout=0", "--set", "decoder_dropout=0"]


def make_folder_dataset(root: Path, n_train=8, n_val=3, size=80):
    """Procedural shapes written as JPEG/PNG files in mmseg's layout, so --dataset folder (with the full
    augmentation pipeline) has something to read."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split / "sub").mkdir(parents=True)
        (root / "annotations" / split / "sub").mkdir(parents=True)
        for i in range(n):
            image, label = render_shapes(rng, size)
            Image.fromarray(image).save(root / "images" / split / "sub" / f"{i}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / "sub" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(SHAPE_CLASSES))
    return ["--dataset", "folder", "--data-root", str(root), "--class-names", str(root / "classes.txt"),
            "--scale", "96", "64"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


# ------------------------------------------------------------------------------------- optimiser rules
def test_param_rule_is_mmcv_custom_keys():
    keys = optim.CUSTOM_KEYS
    rule = {name: optim.param_rule(name, keys) for name in [
        "backbone.layer1.0.bn1.weight", "backbone.attnpool.q_proj.weight", "text_encoder.ln_final.weight",
        "context_decoder.decoder.0.norm1.weight", "decode_head.scale_heads.0.0.bn.weight", "neck.fpn_convs.0.conv.bias",
        "contexts", "gamma"]}
    # backbone: lr x0.1 with full decay, even for its norm layers (the first matching key wins, alone)
    assert rule["backbone.layer1.0.bn1.weight"] == {"key": "backbone", "lr_mult": 0.1, "decay_mult": 1.0}
    assert rule["backbone.attnpool.q_proj.weight"]["key"] == "backbone"
    # text_encoder is the longest key, so it is tried first
    assert rule["text_encoder.ln_final.weight"] == {"key": "text_encoder", "lr_mult": 0.0, "decay_mult": 1.0}
    assert rule["context_decoder.decoder.0.norm1.weight"] == {"key": "norm", "lr_mult": 1.0, "decay_mult": 0.0}
    for name in ("decode_head.scale_heads.0.0.bn.weight", "neck.fpn_convs.0.conv.bias", "contexts", "gamma"):
        assert rule[name] == {"key": None, "lr_mult": 1.0, "decay_mult": 1.0}, name
    # keys of equal length are tried alphabetically: 'abcd' before 'norm'
    assert optim.param_rule("x.norm.abcd", {"norm": {"lr_mult": 2.0}, "abcd": {"lr_mult": 3.0}})["key"] == "abcd"


def test_param_groups_skip_the_frozen_text_encoder():
    model = build_model("denseclip_tiny", SHAPE_CLASSES, freeze_text_encoder=True)  # the official set-up
    groups = {g["name"]: g for g in optim.param_groups(model, 1e-4, 1e-4, optim.CUSTOM_KEYS)}
    assert set(groups) == {"default", "backbone", "norm"}
    assert groups["backbone"]["initial_lr"] == pytest.approx(1e-5) and groups["backbone"]["weight_decay"] == 1e-4
    assert groups["norm"]["weight_decay"] == 0.0 and groups["default"]["weight_decay"] == 1e-4
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(names[i].startswith("text_encoder.") for i in in_groups)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {names[i] for i in in_groups}
    assert model.contexts.requires_grad and id(model.contexts) in in_groups  # contexts learn through the frozen tower


def test_an_unfrozen_text_encoder_learns_at_the_backbone_multiplier():
    model = build_model("denseclip_tiny", SHAPE_CLASSES, freeze_text_encoder=False, freeze_token_embedding=False)
    groups = {g["name"]: g for g in optim.param_groups(model, 1e-3, 1e-4, optim.custom_keys_for(0.5, True))}
    assert groups["text_encoder"]["initial_lr"] == pytest.approx(5e-4)
    assert {id(p) for p in groups["text_encoder"]["params"]} == {id(p) for p in model.text_encoder.parameters()}
    assert groups["backbone"]["initial_lr"] == pytest.approx(5e-4)
    assert "text_encoder" not in {g["name"] for g in optim.param_groups(model, 1e-3, 1e-4, optim.custom_keys_for(0.5))}


def test_lr_schedule_values():
    def lr(it):
        return optim.lr_at(it, 1e-4, max_iters=1000, warmup_iters=100, min_lr=1e-6)

    assert lr(0) == pytest.approx(1e-4 * 1e-6)  # warmup starts at base * warmup_ratio
    assert lr(50) == pytest.approx((9.9e-5 * 0.95 ** 0.9 + 1e-6) * (0.5 + 0.5e-6))
    assert lr(100) == pytest.approx(9.9e-5 * 0.9 ** 0.9 + 1e-6)  # warmup over: the plain poly value
    assert lr(500) == pytest.approx(9.9e-5 * 0.5358867312681466 + 1e-6)
    assert lr(999) == pytest.approx(9.9e-5 * 0.001 ** 0.9 + 1e-6)
    # min_lr is absolute: a group at base 1e-5 decays towards 1e-6 too
    assert optim.lr_at(500, 1e-5, 1000, 100, 1e-6) == pytest.approx(9e-6 * 0.5358867312681466 + 1e-6)


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple"):
        train.main(["--global-batch", "5", "--batch-size", "2", "--out-dir", str(tmp_path)])


# ------------------------------------------------------------------------------------------ smoke run
def test_smoke_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    res = train.main([*TINY, "--iters", "3", "--save-interval", "2", "--out-dir", str(out)])
    assert 0.0 <= res["mIoU"] <= 1.0
    assert "val mIoU" in capsys.readouterr().out.strip().splitlines()[-1]
    assert sorted(p.name for p in out.glob("iter_*.pt")) == ["iter_000002.pt", "iter_000003.pt"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    assert {"loss_decode", "loss_aux", "lr", "it_per_s", "eta_s"} <= set(steps[0])
    assert records[-1]["mIoU"] == res["mIoU"]
    ckpt = load(out / "iter_000003.pt")  # plain data: weights_only loading works
    assert ckpt["iter"] == 3 and ckpt["args"]["model"] == "denseclip_tiny" and len(ckpt["rng"]) == 1
    # eval.py takes the data options from the checkpoint and reproduces the final validation numbers
    ev = evaluation.main([str(out / "iter_000003.pt"), "--workers", "0"])
    assert ev["mIoU"] == res["mIoU"] and ev["aAcc"] == res["aAcc"]


def test_threads_from_the_recipe_or_the_option_and_restored_after(tmp_path, monkeypatch):
    """--threads: the procedural recipe's 1 during the run, and eval.py's on procedural data; an explicit value
    wins; with OMP_NUM_THREADS set and --threads unset torch's count is left alone; the caller's count is back
    after each."""
    seen = []

    def spy(real):
        return lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1]
    monkeypatch.setattr(train, "train_step", spy(train.train_step))
    monkeypatch.setattr(evaluation, "evaluate", spy(evaluation.evaluate))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    caller = torch.get_num_threads()
    torch.set_num_threads(3)  # neither 1 nor the recipe's nor this machine's 2 cores
    try:
        for i, (extra, env, expected) in enumerate([([], None, 1), (["--threads", "2"], None, 2), ([], "4", 3),
                                                    (["--threads", "2"], "4", 2)]):
            if env:
                monkeypatch.setenv("OMP_NUM_THREADS", env)
            seen.clear()
            train.main([*TINY, "--iters", "1", "--out-dir", str(tmp_path / str(i)), *extra])
            assert seen == [expected] and torch.get_num_threads() == 3, (extra, env, seen)
            seen.clear()
            evaluation.main([str(tmp_path / str(i) / "iter_000001.pt"), "--workers", "0", *extra])
            assert seen == [expected] and torch.get_num_threads() == 3, (extra, env, seen)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    finally:
        torch.set_num_threads(caller)


def test_unreadable_sample_names_the_file(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_train=4, n_val=1)
    bad = tmp_path / "data" / "images" / "training" / "sub" / "2.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="2.jpg"):
        train.main([*TINY, *data, "--iters", "4", "--out-dir", str(tmp_path / "run")])


# ----------------------------------------------------------------------------------------------- resume
def test_resume_is_bit_exact(tmp_path):
    """2N steps in one go == N steps, stop, --resume auto, N more: with dropout on, 2 accumulation steps, and the
    full augmentation pipeline (random resize, crop, flip, photometric) of a folder dataset. 8 images at 4 per
    step make 2 steps an epoch, so the run stops mid-epoch and the second half crosses epochs."""
    data = make_folder_dataset(tmp_path / "data")
    common = [*TINY, *data, "--global-batch", "4", "--iters", "6", "--save-interval", "3", "--warmup-iters", "2"]
    train.main([*common, "--out-dir", str(tmp_path / "a")])
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "iter_000003.pt", tmp_path / "b")  # as if the run had stopped at step 3
    train.main([*common, "--out-dir", str(tmp_path / "b"), "--resume", "auto"])
    a, b = load(tmp_path / "a" / "iter_000006.pt"), load(tmp_path / "b" / "iter_000006.pt")
    assert load(tmp_path / "a" / "iter_000003.pt")["data"] == {"epoch": 1, "seen": 4}
    assert a["data"] == b["data"] == {"epoch": 2, "seen": 8}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    mid = load(tmp_path / "a" / "iter_000003.pt")
    assert not torch.equal(mid["model"]["gamma"], a["model"]["gamma"])  # the second half did train


# ----------------------------------------------------------------------------------------------- DDP
def test_ddp_two_ranks_match_one_process(tmp_path):
    """torchrun 2 ranks x batch 1 (gloo, SyncBN) == 1 process x batch 2: same samples, same gradients, same
    BatchNorm statistics; dropout off so that the two runs draw nothing differently."""
    common = [*TINY, *NO_DROPOUT, "--iters", "3", "--warmup-iters", "1", "--global-batch", "2"]
    torchrun("train.py", [*common, "--batch-size", "1", "--out-dir", str(tmp_path / "ddp")])
    train.main([*common, "--batch-size", "2", "--out-dir", str(tmp_path / "one")])
    ddp, one = load(tmp_path / "ddp" / "iter_000003.pt"), load(tmp_path / "one" / "iter_000003.pt")
    assert ddp["data"] == one["data"] and len(ddp["rng"]) == 2
    for k, v in one["model"].items():
        # The attention pool's key bias has an exactly zero gradient (softmax ignores a shift shared by all keys):
        # Adam normalises the rounding noise left in it into steps of ~lr, which differ between the two runs. So
        # has the key third of the (trained, tiny) text encoder's in_proj_bias.
        a, b = ddp["model"][k].float(), v.float()
        if k.endswith("attn.in_proj_bias"):
            w = len(a) // 3
            a, b = torch.cat([a[:w], a[2 * w:]]), torch.cat([b[:w], b[2 * w:]])
        if k != "backbone.attnpool.k_proj.bias":
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
    assert torch.allclose(ddp["model"]["decode_head.scale_heads.0.0.bn.running_var"],
                          one["model"]["decode_head.scale_heads.0.0.bn.running_var"], rtol=1e-4)
