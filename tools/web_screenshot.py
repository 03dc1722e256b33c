"""A screenshot of the web demo in a real headless browser: `demo.py CKPT --serve` on a free local port, Chromium
driven by Playwright uploads an image, types class names and score-map names, presses *segment*, waits for the
pictures and saves the page as a PNG (docs/web_demo.png is made this way).

    pip install playwright && playwright install chromium       # or a system Chromium: --browser /usr/bin/chromium
    python tools/web_screenshot.py runs/demo/iter_003000.pt shapes.png --out docs/web_demo.png

Needs the `web` extra (Gradio) and Playwright with a Chromium; nothing here is needed by the tests, which call the
demo through gradio_client instead (tests/test_web.py).
"""
import argparse
import shutil
import sys
from pathlib import Path

from denseclip.errors import require_package, run_main
from denseclip.run import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402  (the script next to tools/: its --serve path is what is shown)


def screenshot(url: str, image: str, classes: str, score_maps: str, out: Path, browser_path=None, width: int = 1400):
    """Open the page, run one segmentation through the browser's own controls, save the full page."""
    sync_api = require_package("playwright.sync_api", "tools/web_screenshot.py", "web")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(headless=True, executable_path=browser_path)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(image)
        names = page.get_by_label("class names (comma-separated)")
        names.fill(classes)
        page.get_by_label("score maps of (comma-separated, any names; empty: none)").fill(score_maps)
        page.get_by_role("button", name="segment").click()
        # the two output pictures are in once three images show: the uploaded one, the prediction, the score maps
        page.wait_for_function("document.querySelectorAll('img[src*=\"file=\"]').length >= 3", timeout=120_000)
        page.wait_for_timeout(1000)  # let the images finish decoding and the layout settle
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="what demo.py --serve serves")
    p.add_argument("image", help="the image to upload")
    p.add_argument("--classes", default="background, circle, square, triangle, star, ring, cross, heart",
                   help="the class names typed into the page")
    p.add_argument("--score-maps", default="circle, ring, heart", help="the score-map names typed into the page")
    p.add_argument("--out", default="docs/web_demo.png", help="PNG to write")
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                   help="a Chromium binary (default: the system's chromium if any, else Playwright's own)")
    args = p.parse_args(argv)
    port, thread = web.start_in_thread(lambda port: demo.main([args.checkpoint, "--serve", "--port", str(port)]))
    try:
        screenshot(f"http://127.0.0.1:{port}/", args.image, args.classes, args.score_maps, Path(args.out), args.browser)
    finally:
        web.stop(thread)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
