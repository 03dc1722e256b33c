"""The pictures in docs/, made from trained runs by the project's own commands (demo.py, eval.py --show-dir,
tools/plot_log.py), so that they can be remade after any change to the drawing:

    python tools/doc_pictures.py runs/demo --baseline runs/fpn_demo --detector runs/retina_demo

takes each run folder's latest checkpoint and writes into --out-dir (docs):
  shapes.png, shapes_scores.png   demo.py on validation image 11 of the built-in data, with --score-maps
  eval_show.png                   eval.py --show-dir's picture of validation image 1 (segmentation)
  eval_show_detection.png         eval.py --show-dir's picture of validation image 0 (the detector, if given)
  curves.png                      tools/plot_log.py of the segmentor's run and the --baseline run
docs/web_demo.png is a browser's screenshot: tools/web_screenshot.py.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from denseclip.data.procedural import ProceduralShapes
from denseclip.errors import MissingFileError, run_main
from denseclip.run.checkpoints import latest_checkpoint
from denseclip.run.outputs import check_out_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import demo  # noqa: E402
import eval as evaluation  # noqa: E402
import plot_log  # noqa: E402

DEMO_IMAGE, SEG_IMAGE, DET_IMAGE = 11, 1, 0  # validation images: the demo's, and the --show-dir ones shown


def checkpoint_in(run: str) -> Path:
    path = latest_checkpoint(Path(run))
    if path is None:
        raise MissingFileError(f"{run}: no iter_*.pt checkpoint in it (give a train.py --out-dir)")
    return path


def show_dir_picture(checkpoint: str, index: int, dest: Path, show_dir: Path):
    """eval.py --show-dir over the first validation images, up to `index`; the picture of image `index` -> dest
    (the built-in data's pictures are named by index; a file dataset's by its images, of which one is taken)."""
    evaluation.main([checkpoint, "--val-size", str(index + 1), "--workers", "0", "--show-dir", str(show_dir)])
    pictures = sorted(p for p in show_dir.rglob("*.png") if not p.stem.endswith(("_label", "_scores")))
    shutil.copy(pictures[index], dest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("segmentor", help="train.py's run folder of a segmentor on the built-in data")
    p.add_argument("--baseline", help="another run folder whose curves to draw with the segmentor's (default: none)")
    p.add_argument("--detector", help="train.py's run folder of a detector on the built-in data (default: none)")
    p.add_argument("--out-dir", default="docs", help="the pictures go here")
    args = p.parse_args(argv)
    out, segmentor = check_out_dir(args.out_dir, "--out-dir"), str(checkpoint_in(args.segmentor))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = tmp / "shapes.png"
        Image.fromarray(ProceduralShapes("val").raw(DEMO_IMAGE)[0]).save(photo)
        demo.main([segmentor, str(photo), "--out-dir", str(tmp / "demo"), "--score-maps", "circle,ring,heart"])
        shutil.copy(tmp / "demo" / "shapes.png", out / "shapes.png")
        shutil.copy(tmp / "demo" / "shapes_scores.png", out / "shapes_scores.png")
        show_dir_picture(segmentor, SEG_IMAGE, out / "eval_show.png", tmp / "seg")
        if args.detector:
            show_dir_picture(str(checkpoint_in(args.detector)), DET_IMAGE, out / "eval_show_detection.png", tmp / "det")
    plot_log.main([args.segmentor, *([args.baseline] if args.baseline else []), "--out", str(out / "curves.png")])
    print(f"wrote the pictures to {out}")


if __name__ == "__main__":
    run_main(main)
