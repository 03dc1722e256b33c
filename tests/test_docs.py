"""Docs that run: every command shown in README.md, data/README.md and the pages under docs/ is executed here in a
smoke form, so a documented flag, path or layout cannot drift from the code; every relative link between them
resolves (file and heading), and README.md stays short.

SMOKE maps each documented command (whitespace-normalised, as written) to the arguments appended for its smoke run:
the documented arguments themselves are parsed by the real script, and the appended ones (argparse: the last value
wins) shrink it to a tiny model, a few images and one iteration. Scripts run in a project folder made by the
`project` fixture with the documented layout: data/ade/ADEChallengeData2016 (tiny images, labels 0..150),
data/mine (a folder dataset), pretrained/RN50.pt (a tiny OpenAI CLIP TorchScript archive), runs/r50/iter_080000.pt
and denseclip_fpn_res50.pth (tiny checkpoints, ours and mmseg-style). torchrun commands run as one process
(test_train.py runs torchrun itself); pip commands run as `pip install --dry-run --no-deps --no-index`.

A new documented command fails test_every_documented_command_has_a_smoke_form until it gets a row here.
"""
import importlib
import importlib.util
import re
import shlex
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

import train  # noqa: E402
from denseclip.data.procedural import ProceduralShapes, SHAPE_CLASSES  # noqa: E402

DOCS = ("README.md", "data/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
README_MAX_LINES = 200  # issue 14: what, two commands, paper -> code, headline results, links; the rest under docs/
TINY = ["--model", "denseclip_tiny"]
SHORT = ["--iters", "1", "--batch-size", "2", "--global-batch", "2", "--crop-size", "32", "--scale", "48", "32",
         "--val-size", "2", "--eval-interval", "0", "--workers", "0", "--set", "test_mode=whole"]

# Detectors: procedural images of 32 pixels kept at that size, 4 per epoch.
DET = ["--iters", "1", "--batch-size", "2", "--global-batch", "2", "--crop-size", "32", "--train-size", "4",
       "--val-size", "2", "--eval-interval", "0", "--workers", "0", "--set", "min_size=32", "--set", "max_size=64"]
COCO_TINY = ["--model", "retinanet_tiny", "--iters", "1", "--batch-size", "2", "--global-batch", "2", "--val-size",
             "2", "--eval-interval", "0", "--workers", "0", "--set", "min_size=64", "--set", "max_size=107"]

SMOKE = {
    # README.md: set-up, ADE20K, results
    "pip install -e .": [],
    'pip install -e ".[dev]"': [],
    "python train.py": [*SHORT, "--out-dir", "runs/smoke"],
    "python -m pytest -q": ["--collect-only", "tests/test_metrics.py"],
    "python train.py --threads 2": [*SHORT, "--out-dir", "runs/smoke"],
    "python train.py --threads 0": [*SHORT, "--out-dir", "runs/smoke"],
    "python train.py --dataset ade20k --pretrained pretrained/RN50.pt": [*SHORT, "--out-dir", "runs/smoke"],
    "torchrun --nproc_per_node 8 train.py --dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt "
    "--out-dir runs/r50": [*TINY, *SHORT, "--out-dir", "runs/smoke"],  # runs/r50 holds the fixture's checkpoint
    "python eval.py runs/r50/iter_080000.pt --dataset ade20k --aug-test": ["--scale", "256", "128", "--workers", "0"],
    "python eval.py denseclip_fpn_res50.pth --model denseclip_r50 --dataset ade20k": [*TINY, "--scale", "48", "32",
                                                                                     "--val-size", "2", "--workers",
                                                                                     "0"],
    "python train.py --help": [],
    "python bench/seeds.py": ["--models", "fpn_tiny", "--seeds", "0", "--jobs", "1", "--out-dir", "runs/seeds", "--",
                              *SHORT],
    # docs/detection.md (the first also in README.md's results)
    "python train.py --model retinanet_denseclip_tiny": [*DET, "--out-dir", "runs/smoke"],
    "python train.py --model retinanet_tiny": [*DET, "--out-dir", "runs/smoke"],
    "python train.py --model maskrcnn_denseclip_tiny": [*DET, "--out-dir", "runs/smoke"],
    # docs/zero-shot.md: pictures, zero-shot; README.md: curves (runs/demo, shapes.png, pretrained/random_tiny.pt:
    # the fixture)
    "python -c \"from PIL import Image; from denseclip.data.procedural import ProceduralShapes as P; "
    "Image.fromarray(P('val').raw(11)[0]).save('shapes.png')\"": [],
    "python demo.py runs/demo/iter_003000.pt shapes.png --out-dir runs/demo_pictures --score-maps circle,ring,heart":
        [],
    "python demo.py pretrained/random_tiny.pt shapes.png --zero-shot --classes circle,ring,heart --out-dir "
    "runs/zs_pictures": [],
    "python tools/doc_pictures.py runs/demo --baseline runs/fpn_demo --detector runs/retina_demo": [
        "--out-dir", "runs/doc_pictures"],
    "python tools/plot_log.py runs/demo runs/fpn_demo": [],
    'pip install -e ".[plot]"': [],
    # docs/zero-shot.md: the web demo (served in a thread and closed again: test_documented_command_runs)
    'pip install -e ".[web]"': [],
    "python demo.py runs/demo/iter_003000.pt --serve": [],
    "python eval.py pretrained/RN50.pt --zero-shot --dataset ade20k": ["--scale", "48", "32", "--val-size", "2",
                                                                      "--workers", "0"],
    "python tools/random_clip.py pretrained/random_tiny.pt": [],
    "python eval.py pretrained/random_tiny.pt --zero-shot --readout maskclip --crop-size 128": [
        "--val-size", "2", "--workers", "0"],
    # docs/zero-shot.md: the ViT read-outs (pretrained/ViT-B-16.pt, random_vit.pt, photo.jpg: the fixture)
    "python eval.py pretrained/ViT-B-16.pt --zero-shot --readout naclip --dataset ade20k": [
        "--scale", "48", "32", "--val-size", "2", "--workers", "0"],
    "python eval.py pretrained/ViT-B-16.pt --zero-shot --readout sclip --dataset folder --data-root data/mine "
    "--class-names data/mine/names.txt": ["--scale", "48", "32", "--val-size", "2", "--workers", "0"],
    'python demo.py pretrained/ViT-B-16.pt --zero-shot --readout naclip --classes "cat,sofa,window" photo.jpg': [
        "--scale", "96", "64", "--out-dir", "runs/zero_shot_demo"],
    "python tools/random_clip.py pretrained/random_vit.pt --vit": [],
    "python eval.py pretrained/random_vit.pt --zero-shot --readout naclip": ["--val-size", "2", "--workers", "0"],
    "python train.py --out-dir runs/demo": [*SHORT, "--out-dir", "runs/smoke"],
    'pip install -e ".[tensorboard]"': [],
    "python tools/plot_log.py runs/demo": [],
    # docs/export.md (runs/demo/iter_003000.safetensors: the fixture; the ONNX path is tests/test_export.py's)
    'pip install -e ".[export]"': [],
    "python tools/export.py runs/demo/iter_003000.pt": ["--formats", "safetensors"],
    "python tools/export.py --help": [],
    "python tools/export.py denseclip_fpn_res50.pth --model denseclip_r50 --out exports/r50 --text-free": [
        *TINY, "--formats", "safetensors"],
    "python demo.py runs/demo/iter_003000.safetensors shapes.png --out-dir runs/export_demo": [],
    "python eval.py runs/demo/iter_003000.safetensors": ["--workers", "0"],
    # docs/detection.md: COCO
    "torchrun --nproc_per_node 8 train.py --dataset coco --model retinanet_denseclip_r50 --pretrained "
    "pretrained/RN50.pt --out-dir runs/retina_r50": [*COCO_TINY, "--out-dir", "runs/smoke"],
    "python eval.py runs/retina_r50/iter_NNNNNN.pt --out dets.json": ["--workers", "0"],
    # docs/speed.md (complexity.py also in README.md's results)
    "python bench/complexity.py": ["--configs", "denseclip_tiny", "--size", "64"],
    "python bench/throughput.py --configs denseclip_tiny fpn_tiny --iters 2 --warmup 1": [
        "--configs", "denseclip_tiny", "--iters", "1", "--warmup", "0", "--size", "64"],
    "python bench/loader.py": ["--samples", "1", "--rounds", "1"],
    "python bench/train_step.py": ["--config", "denseclip_tiny", "--size", "64", "--iters", "1", "--warmup", "0",
                                   "--no-compile", "--memory-configs"],
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint MASTER:29400 --rdzv_id r50 train.py "
    "--dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt --batch-size 2 --out-dir runs/r50": [
        *TINY, *SHORT, "--out-dir", "runs/smoke"],  # two launchers: tests/test_multinode.py
    "torchrun --nnodes 2 --node_rank N --nproc_per_node 8 --master_addr MASTER --master_port 29500 train.py "
    "--dataset ade20k --model denseclip_r50 --pretrained pretrained/RN50.pt --batch-size 2 --out-dir runs/r50": [
        *TINY, *SHORT, "--out-dir", "runs/smoke"],
    "python bench/train_step.py --only-text": ["--config", "denseclip_tiny", "--iters", "1", "--warmup", "0"],
    "python bench/train_step.py --only-steps": ["--step-configs", "denseclip_tiny:64", "--step-batches", "1",
                                                "--iters", "1", "--warmup", "0", "--no-step-memory"],
    "python bench/threads.py": ["--iters", "2", "--val-size", "2", "--loads", "0", "--rounds", "1", "--settings",
                                "one"],
    # data/README.md
    "python -m denseclip.data.preflight --dataset ade20k": [],
    "python -m denseclip.data.preflight --dataset folder --data-root data/mine --class-names data/mine/names.txt": [],
    "python -m denseclip.data.preflight --dataset coco": [],
    "python tools/coco_object.py": ["--workers", "1"],
    "python -m denseclip.data.preflight --dataset coco --train-ann my/train.json --train-images my/images --val-ann "
    "my/val.json --val-images my/images": [],
    "python train.py --dataset folder --data-root data/mine --class-names data/mine/names.txt --out-dir runs/mine":
        SHORT,
    "python train.py --dataset coco --model retinanet_denseclip_r50 --pretrained pretrained/RN50.pt":
        [*COCO_TINY, "--out-dir", "runs/smoke"],
    "python train.py --dataset coco --model retinanet_denseclip_r50 --pretrained pretrained/RN50.pt --train-ann "
    "my/train.json --train-images my/images --val-ann my/val.json --val-images my/images":
        [*COCO_TINY, "--out-dir", "runs/smoke"],
}

COMMAND = r"(?:python|torchrun|pip)\s"


def documented_commands():
    """{command: file} for every shell command in the docs' code blocks and inline code."""
    found = {}
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if lang in ("", "bash", "sh", "shell"):
                for line in block.replace("\\\n", " ").splitlines():
                    for part in re.sub(r"\s+#.*$", "", line).split("&&"):
                        if re.match(COMMAND, part.strip()):
                            found.setdefault(" ".join(part.split()), doc)
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", text):
            if re.match(COMMAND, span):
                found.setdefault(" ".join(span.split()), doc)
    return found


def test_every_documented_command_has_a_smoke_form():
    documented = documented_commands()
    missing = [f"{doc}: `{cmd}`" for cmd, doc in documented.items() if cmd not in SMOKE]
    assert not missing, ("documented commands without a smoke form; add a row (command -> smoke arguments) to SMOKE "
                         "in tests/test_docs.py:\n  " + "\n  ".join(missing))
    stale = [cmd for cmd in SMOKE if cmd not in documented]
    assert not stale, f"SMOKE rows for commands no longer documented (delete them): {stale}"


LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)|<img src="([^"]+)"')


def heading_anchors(text: str) -> set:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_relative_links_resolve():
    broken = []
    for doc in (*DOCS, "bench/README.md"):
        path = ROOT / doc
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in (a or b for a, b in LINK.findall(text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{doc}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
                broken.append(f"{doc}: {target} (no such heading in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_paper_to_code_table_names_what_exists():
    """Every file and function in README.md's "Paper -> code" table exists: `file.py`: `Class.method`, `function`."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Paper → code"):].split("\n## ", 1)[0]
    rows = [line.rsplit("|", 2)[-2] for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 10, "no Paper -> code table found"
    missing = []
    for code in rows:
        source = None
        for span in re.findall(r"`([^`]+)`", code):
            if span.endswith(".py"):
                path = ROOT / "denseclip" / span if (ROOT / "denseclip" / span).exists() else ROOT / span
                source = path.read_text() if path.exists() else missing.append(f"{span} (no such file)")
                continue
            for name in re.sub(r"\(.*\)", "", span).split("."):
                if source is not None and not re.search(rf"^\s*(?:def|class) {name}\b", source, re.M):
                    missing.append(f"{span} (no {name} in the file before it)")
    assert not missing, "README.md's Paper -> code table names what is not there:\n  " + "\n  ".join(missing)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move the detail to docs/"


def write_tree(root: Path, n_classes: int, zero_is_other: bool, sizes=((32, 24), (24, 32))):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"images/{split}/{i}.jpg")
            label = rng.integers(0, n_classes + zero_is_other, (h, w), dtype=np.uint8)
            Image.fromarray(label).save(root / f"annotations/{split}/{i}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working folder laid out as the docs describe, with tiny stand-ins for ADE20K and the weights."""
    from peers import openai_clip, tiny_openai_clip

    root = tmp_path_factory.mktemp("project")
    write_tree(root / "data/ade/ADEChallengeData2016", 150, True)
    write_tree(root / "data/mine", len(SHAPE_CLASSES), False)
    (root / "data/mine/names.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")
    for split in ("train2017", "val2017"):  # COCO-Stuff's stored maps, for tools/coco_object.py
        (root / "data/coco_stuff164k/annotations" / split).mkdir(parents=True)
        Image.fromarray(np.full((4, 6), 91, np.uint8)).save(root / f"data/coco_stuff164k/annotations/{split}/1.png")
    (root / "pretrained").mkdir()
    torch.manual_seed(0)
    example = (torch.randn(1, 3, 64, 64), openai_clip.tokenize(["a"]))  # the OpenAI file format, as distributed
    torch.jit.trace(tiny_openai_clip(), example, check_trace=False).save(str(root / "pretrained/RN50.pt"))
    vit = openai_clip.model.CLIP(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64,
                                 vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=128,
                                 transformer_heads=2, transformer_layers=1).float().eval()
    torch.jit.trace(vit, example, check_trace=False).save(str(root / "pretrained/ViT-B-16.pt"))  # a tiny stand-in
    out = root / "runs/r50"
    train.main(["--dataset", "ade20k", "--data-root", str(root / "data/ade/ADEChallengeData2016"), *SHORT,
                "--out-dir", str(out)])
    ckpt = out / "iter_080000.pt"
    shutil.move(out / "iter_000001.pt", ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["args"]["data_root"] = None  # as if trained in this folder (the default data/ade/ADEChallengeData2016)
    torch.save(state, ckpt)
    torch.save({"state_dict": state["model"], "meta": {"iter": 80000}}, root / "denseclip_fpn_res50.pth")
    # Detection: a COCO-format dataset as my/ (json + images) and in COCO's own layout under data/coco, and a
    # detector checkpoint trained on it in runs/retina_r50.
    from test_coco import coco2017_layout, make_coco_dataset

    make_coco_dataset(root / "my")
    coco2017_layout(root / "my", root / "data/coco")
    out = root / "runs/retina_r50"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(root)  # the default data root data/coco, as a user in this folder
    train.main(["--dataset", "coco", *COCO_TINY, "--out-dir", str(out)])
    monkeypatch.undo()
    shutil.move(out / "iter_000001.pt", out / "iter_NNNNNN.pt")
    # Pictures and zero-shot: a procedural denseclip_tiny run as runs/demo (with its log.jsonl), a random CLIP file
    # and the demo's input image.
    train.main([*SHORT, "--out-dir", str(root / "runs/demo")])
    shutil.move(root / "runs/demo/iter_000001.pt", root / "runs/demo/iter_003000.pt")
    (root / "runs/fpn_demo").mkdir()  # a baseline run to compare curves with: the same log will do
    shutil.copy(root / "runs/demo/log.jsonl", root / "runs/fpn_demo/log.jsonl")
    shutil.copytree(root / "runs/retina_r50", root / "runs/retina_demo")  # a detector run for the docs' pictures
    script_main("tools/random_clip.py")([str(root / "pretrained/random_tiny.pt")])
    script_main("tools/random_clip.py")([str(root / "pretrained/random_vit.pt"), "--vit"])
    script_main("tools/export.py")([str(root / "runs/demo/iter_003000.pt"), "--formats", "safetensors"])
    Image.fromarray(ProceduralShapes("val", size=64).raw(11)[0]).save(root / "shapes.png")
    Image.fromarray(ProceduralShapes("val", size=80).raw(3)[0]).save(root / "photo.jpg")
    return root


def script_main(path: str):
    if path in ("train.py", "eval.py"):
        return importlib.import_module(path[:-3]).main
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("command", sorted(SMOKE))
def test_documented_command_runs(command, project, monkeypatch):
    words, extra = shlex.split(command), SMOKE[command]
    monkeypatch.chdir(project)
    shutil.rmtree(project / "runs/smoke", ignore_errors=True)  # a fresh run each: train.py refuses another's folder
    if words[0] == "pip":
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                              "--no-index", *[w.replace(".", str(ROOT), 1) if w.startswith(".") else w
                                              for w in words[2:]]], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "Would install denseclip" in out.stdout, out.stdout + out.stderr
        return
    if words[:3] == ["python", "-m", "pytest"]:
        out = subprocess.run([sys.executable, *words[1:], *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout[-2000:]
        return
    if words[1] == "-c":
        out = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return
    if words[0] == "torchrun":  # drop the launcher's options: one process here
        words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
    if words[1] == "-m":
        main, argv = importlib.import_module(words[2]).main, words[3:]
    else:
        main, argv = script_main(words[1]), words[2:]
    if "--serve" in argv:  # the web demo: served until it answers, then closed
        from denseclip.run import web

        port, thread = web.start_in_thread(lambda port: main([*argv, *extra, "--port", str(port)]))
        web.stop(thread)
        assert not thread.is_alive()
        return
    try:
        main([*argv, *extra])
    except SystemExit as e:  # --help
        assert e.code == 0 and "--help" in argv
