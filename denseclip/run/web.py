"""The web demo (`python demo.py CKPT --serve`): a Gradio page over demo.py's pictures. Upload an image, type class
names, and see the prediction over the photo with its legend (visualize.segmentation_picture), the legend as a
table, and the score maps of any names asked for (visualize.score_picture), as demo.py's --score-maps.

A thin layer: everything it shows comes from the `explain(path, names, score_names)` callable that demo.py passes in
(its model, prediction and drawing: the same pictures demo.py writes), so this file knows only Gradio. Gradio is an
optional dependency (`pip install -e ".[web]"`), imported when the page is built. The one endpoint, `/segment`,
is also an API: gradio_client's `Client(url).predict(handle_file(path), "cat, dog", "cat", api_name="/segment")`
returns the picture's file, the legend table and the score-map picture's file (tests/test_web.py).

No upstream counterpart: the official DenseCLIP has no demo; Gradio is what the field's demos run on.
"""
import os
import socket
import threading
import time
from typing import Callable

from ..errors import require_package

LEGEND_HEADERS = ["class", "colour", "share of pixels"]
SERVING = threading.Event()  # set by serve() once its page answers (start_in_thread waits for it)


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a demo on a laptop sends nothing anywhere
    return require_package("gradio", "the web demo (demo.py --serve)", "web")


def legend_rows(legend: list) -> list:
    """visualize's legend entries as table rows: name, colour as #rrggbb, share of pixels in %."""
    return [[e["name"], "#%02x%02x%02x" % tuple(e["colour"]), f"{100 * e['share']:.1f}%"] for e in legend]


def split_names(text: str) -> list:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def build_app(explain: Callable, default_names: str, title: str):
    """The page: image, class names and score-map names in; picture, legend table and score maps out."""
    gr = import_gradio()

    def segment(path, names_text, score_text):
        if not path:
            raise gr.Error("upload an image first")
        try:
            res = explain(path, split_names(names_text) or None, split_names(score_text) or None)
        except (ValueError, SystemExit) as e:  # e.g. names too long for the text encoder, a text-free export
            raise gr.Error(str(e)) from None
        return res.picture, legend_rows(res.info["legend"]), res.scores

    with gr.Blocks(title="DenseCLIP demo") as app:
        gr.Markdown(f"## DenseCLIP: {title}\nUpload an image, type the class names to segment with (comma-separated;"
                    " the model's own classes use its decode head, other names its pixel-text score map), and "
                    "press *segment*.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image")
                names = gr.Textbox(value=default_names, label="class names (comma-separated)", lines=2)
                score_maps = gr.Textbox(label="score maps of (comma-separated, any names; empty: none)")
                button = gr.Button("segment", variant="primary")
            with gr.Column(scale=2):
                picture = gr.Image(type="pil", format="png", label="prediction", interactive=False)
                legend = gr.Dataframe(headers=LEGEND_HEADERS, label="legend", interactive=False)
                scores = gr.Image(type="pil", format="png", label="score maps (cosine, one shared range)",
                                  interactive=False)
        button.click(segment, [image, names, score_maps], [picture, legend, scores], api_name="segment")
    return app


def serve(explain: Callable, default_names: str, title: str, host: str = "127.0.0.1", port: int = 7860):
    """Build the page and serve it on host:port until Ctrl+C (or stop()); returns the app."""
    app = build_app(explain, default_names, title)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True)
    print(f"serving the DenseCLIP demo on http://{host}:{port} (Ctrl+C stops it)")
    SERVING.set()  # launch has checked that the page answers: a client may come
    app.block_thread()
    return app


def free_port() -> int:
    """A local TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_in_thread(run: Callable[[int], object], timeout: float = 120.0):
    """(port, thread): run(port) in a daemon thread (e.g. demo.main with --serve --port PORT) on a free local port,
    returned once serve() has the page up; for tests and scripts that drive the served page. stop() ends it."""
    port = free_port()
    SERVING.clear()
    thread = threading.Thread(target=run, args=(port,), daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not SERVING.wait(0.1):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the web demo did not start (see its messages above)")
    return port, thread


def stop(thread: threading.Thread):
    """Close every running Gradio server; the serving thread's blocking loop ends with it."""
    import_gradio().close_all()
    thread.join(10)
