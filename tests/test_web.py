"""The web demo end to end (issue 19): `demo.py CKPT --serve` in a thread on a free local port, called through
gradio_client as a user's script would: the picture it returns is the one demo.py writes for the same image and
names (legend table included), for the model's own classes, open-vocabulary names and zero-shot CLIP weights."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from peers import tiny_openai_clip
from PIL import Image

from denseclip import build_model
from denseclip.data.procedural import SHAPE_CLASSES, render_shapes
from denseclip.errors import run_main
from denseclip.run import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402


def serve(argv, tmp, monkeypatch):
    """demo.main(argv + --serve) in a thread on a free port; (client, thread) once the port answers."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    port, thread = web.start_in_thread(lambda port: demo.main([*argv, "--serve", "--port", str(port)]))
    return Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp / "downloads")), thread


def stop(thread):
    web.stop(thread)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny segmentor saved as train.py saves it, a tiny OpenAI-layout CLIP, one image."""
    tmp = tmp_path_factory.mktemp("web")
    torch.manual_seed(0)
    model = build_model("denseclip_tiny", SHAPE_CLASSES).eval()
    torch.save({"model": model.state_dict(), "args": {"model": "denseclip_tiny", "dataset": "procedural",
                                                      "overrides": []}, "class_names": list(SHAPE_CLASSES)},
               tmp / "model.pt")
    torch.save(tiny_openai_clip().state_dict(), tmp / "clip.pt")
    Image.fromarray(render_shapes(np.random.default_rng(0), 96)[0]).save(tmp / "shapes.png")
    return tmp


def written_by_demo(argv, tmp, name):
    """What demo.py writes for the image with these options: the picture's pixels and its PNG text (legend)."""
    demo.main([*argv, str(tmp / "shapes.png"), "--out-dir", str(tmp / name)])
    im = Image.open(tmp / name / "shapes.png")
    return np.asarray(im.convert("RGB")), json.loads(im.text["legend"])


def check_answer(answer, expected_picture, expected_legend):
    picture, legend, _ = answer
    assert np.array_equal(np.asarray(Image.open(picture).convert("RGB")), expected_picture)
    assert legend["headers"] == web.LEGEND_HEADERS
    assert legend["data"] == web.legend_rows(expected_legend)


def test_served_model_answers_as_demo_writes(files, tmp_path, monkeypatch):
    ckpt = str(files / "model.pt")
    client, thread = serve([ckpt], tmp_path, monkeypatch)
    try:
        own = client.predict(handle_file(files / "shapes.png"), ", ".join(SHAPE_CLASSES), "circle, kettle",
                             api_name="/segment")
        check_answer(own, *written_by_demo([ckpt, "--score-maps", "circle,kettle"], files, "own"))  # decode head
        score_maps = np.asarray(Image.open(own[2]).convert("RGB"))
        assert np.array_equal(score_maps, np.asarray(Image.open(files / "own" / "shapes_scores.png").convert("RGB")))
        names = "disc, box, sky"  # open vocabulary
        new = client.predict(handle_file(files / "shapes.png"), names, "", api_name="/segment")
        check_answer(new, *written_by_demo([ckpt, "--classes", names], files, "open"))
        assert new[2] is None  # no score maps asked for
    finally:
        stop(thread)


def test_served_zero_shot_clip(files, tmp_path, monkeypatch):
    argv = [str(files / "clip.pt"), "--zero-shot", "--classes", "circle,ring"]
    client, thread = serve(argv, tmp_path, monkeypatch)
    try:
        answer = client.predict(handle_file(files / "shapes.png"), "", "", api_name="/segment")  # --classes
        check_answer(answer, *written_by_demo(argv, files, "zero"))
        picture = Image.open(answer[0])
        assert picture.width > 96 * 4  # the enlarged photo and its legend
    finally:
        stop(thread)


def test_missing_gradio_is_a_clear_message(files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: demo.main([str(files / "model.pt"), "--serve"]))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the web demo (demo.py --serve) needs the gradio package") and '".[web]"' in err
