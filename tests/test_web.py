"""The web demo end to end (issue 19): `demo.py CKPT --serve` in a thread on a free local port, called through
gradio_client as a user's script would: the picture it returns is the one demo.py writes for the same image and
names (legend table included), for the model's own classes, open-vocabulary names and zero-shot CLIP weights."""
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from peers import tiny_openai_clip
from PIL import Image

from denseclip import build_model
from denseclip.data.procedural import SHAPE_CLASSES, render_shapes
from denseclip.run import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv, tmp, monkeypatch):
    """demo.main(argv + --serve) in a daemon thread; a client once its port answers (at most 60 s)."""
    import gradio

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    port = free_port()
    thread = threading.Thread(target=demo.main, args=([*argv, "--serve", "--port", str(port)],), daemon=True)
    thread.start()
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.time() < deadline and thread.is_alive(), "the web demo did not start"
            time.sleep(0.1)
    return Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp / "downloads")), gradio, thread


def stop(gradio, thread):
    gradio.close_all()  # the server's blocking loop ends with it
    thread.join(10)
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
    client, gradio, thread = serve([ckpt], tmp_path, monkeypatch)
    try:
        own = client.predict(handle_file(files / "shapes.png"), ", ".join(SHAPE_CLASSES), True, api_name="/segment")
        check_answer(own, *written_by_demo([ckpt], files, "own"))  # the model's classes: its decode head
        score_maps = Image.open(own[2])
        assert score_maps.height == 16 + 96 and score_maps.width > (len(SHAPE_CLASSES) + 1) * 96  # photo + maps
        names = "disc, box, sky"  # open vocabulary
        new = client.predict(handle_file(files / "shapes.png"), names, False, api_name="/segment")
        check_answer(new, *written_by_demo([ckpt, "--classes", names], files, "open"))
        assert new[2] is None  # no score maps asked for
    finally:
        stop(gradio, thread)


def test_served_zero_shot_clip(files, tmp_path, monkeypatch):
    argv = [str(files / "clip.pt"), "--zero-shot", "--classes", "circle,ring"]
    client, gradio, thread = serve(argv, tmp_path, monkeypatch)
    try:
        answer = client.predict(handle_file(files / "shapes.png"), "", False, api_name="/segment")  # --classes
        check_answer(answer, *written_by_demo(argv, files, "zero"))
        picture = Image.open(answer[0])
        assert picture.width > 96 * 4  # the enlarged photo and its legend
    finally:
        stop(gradio, thread)


def test_missing_gradio_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[web\]"'):
        web.import_gradio()
