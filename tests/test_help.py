"""--help a user can work from (issue 19): every option of train.py, eval.py, demo.py and the data pre-flight is
listed with a help text that says its default; train's --model names the configs by task, demo's only the
segmentation ones; eval lists no training-only option."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402
from denseclip.configs import CONFIGS, task_of  # noqa: E402
from denseclip.data import preflight  # noqa: E402

SCRIPTS = {"train": train.parse_args, "eval": evaluation.parse_args, "demo": demo.parse_args,
           "preflight": preflight.main}
TRAIN_ONLY = ["--train-size", "--train-split", "--train-ann", "--train-images"]


def help_text(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[name](["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def entries(text: str) -> dict:
    """{first option string: its help text} of argparse's output: an entry starts at '  -x' or '  --name'."""
    found, current = {}, None
    for line in text.splitlines():
        start = re.match(r"^  (-{1,2}[\w-]+)", line)
        if start:
            current = start.group(1)
            found[current] = line[len(start.group(0)):]
        elif current and line.startswith("    "):
            found[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in found.items()}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_option_has_help_with_its_default(name, capsys, monkeypatch):
    text = help_text(name, capsys, monkeypatch)
    listed = entries(text)
    assert len(listed) > 8, text
    for option, words in listed.items():
        if option in ("-h", "--help"):
            continue
        assert "default" in words, f"{name} --help: {option} does not say its default: {words!r}"
        assert len(words.split("default")[0].strip(" (;:,")) > 5, \
            f"{name} --help: {option} has no help text besides its default: {words!r}"


def test_every_parsed_option_is_listed(capsys, monkeypatch):
    """No option is missing from --help (eval.py's training-only data options are accepted but not listed)."""
    parsers = {"train": train.parse_args, "eval": evaluation.parse_args, "demo": demo.parse_args}
    for name in parsers:
        listed = entries(help_text(name, capsys, monkeypatch))
        usage = help_text(name, capsys, monkeypatch).split("\n\n")[0]
        for flag in re.findall(r"\[(--[\w-]+)", usage):
            assert flag in listed, f"{name}: {flag} in the usage but not listed"
    train_help = entries(help_text("train", capsys, monkeypatch))
    assert all(flag in train_help for flag in TRAIN_ONLY)
    eval_text = help_text("eval", capsys, monkeypatch)
    assert not any(flag in eval_text for flag in TRAIN_ONLY), "eval.py lists training-only options"
    assert "--val-size" in eval_text and "test images" in entries(eval_text)["--scale"]


def test_model_help_names_the_configs_by_task(capsys, monkeypatch):
    seg = [n for n in sorted(CONFIGS) if task_of(n) == "segmentation"]
    det = [n for n in sorted(CONFIGS) if task_of(n) == "detection"]
    train_model = entries(help_text("train", capsys, monkeypatch))["--model"]
    assert "segmentation: " + ", ".join(seg) in train_model and "detection: " + ", ".join(det) in train_model
    assert "(default: denseclip_tiny)" in train_model
    demo_model = entries(help_text("demo", capsys, monkeypatch))["--model"]
    assert "segmentation: " + ", ".join(seg) in demo_model and not any(n in demo_model for n in det)


def test_recipe_options_point_at_the_recipes(capsys, monkeypatch):
    text = help_text("train", capsys, monkeypatch)
    listed = entries(text)
    for option in ("--iters", "--lr", "--batch-size", "--workers", "--eval-interval", "--train-size"):
        assert "default: from the recipe, see below" in listed[option], listed[option]
    assert "defaults (options left unset), by task and dataset" in text and "iters 80000" in text
