"""Run a trained DenseCLIP segmentor on your own images and write pictures, or serve it as a web demo.

    python demo.py runs/demo/iter_003000.pt photos/ --out-dir runs/demo_out            # our checkpoint
    python demo.py runs/demo/iter_003000.pt a.jpg --score-maps circle,star              # + score-map picture
    python demo.py runs/demo/iter_003000.pt a.jpg --classes "disc,box,ring"             # open vocabulary
    python demo.py denseclip_fpn_res50.pth a.jpg --model denseclip_r50                  # official checkpoint
    python demo.py pretrained/RN50.pt a.jpg --zero-shot --classes "sky,tree,road"       # raw CLIP, no training
    python demo.py pretrained/ViT-B-16.pt --zero-shot --readout naclip --classes "cat,sofa,window" photo.jpg
    python demo.py runs/demo/iter_003000.pt --serve                                     # web demo (Gradio)

For each image (a file, or every image under a folder) it writes, under --out-dir and named after the image:
  NAME.png          the prediction blended over the photo (small photos enlarged for display), titled with the
                    model, checkpoint and image, with a legend: colour, name and share of pixels of each class present
  NAME_label.png    the raw prediction: a palette PNG whose pixel values are the class indices (same colours)
  NAME_scores.png   with --score-maps: the pixel-text score map of each named class as a heat map over the photo
Images keep their size and EXIF orientation and are read as the datasets read them (data/image_io.read_image:
OpenCV's IMREAD_COLOR rules, so grey and palette images become RGB and 16-bit ones keep their high byte), so the
demo feeds the model the pixels eval.py does. Large images are segmented in overlapping windows of the model's test
crop (slide inference).

Everything is written under --out-dir and nowhere else, and nothing is overwritten that the run reads: the folder
and the pictures' names are checked before the model is loaded (two images that would give the same picture name,
or a picture that would replace an input image, are refused). An image that cannot be read (a damaged file, or one
smaller than 32 pixels on a side, the image encoder's stride) is skipped: the others are still drawn, and the run
ends by listing the skipped files, with exit status 2.

--classes (open vocabulary) segments with names the model was not trained on: they go through the trained
contexts, the frozen text encoder and the context decoder, and each pixel takes the name with the highest score
map value (softmax(s / τ), the path the auxiliary loss trains). The decode head is NOT used then: it has one
output per training class and knows nothing else. Expect rough masks; the context decoder lets the names attend
to each other, so a name's map also depends on the other names asked for; a text-free export
(drop_text_encoder) cannot encode new names at all. The Python API is the same:
model.predict(images, names=["cat", "dog"]) -> probabilities (B, 2, H, W).

--zero-shot takes an OpenAI CLIP file instead of a trained model and segments by CLIP's own pixel-text scores
(zeroshot.py, as eval.py --zero-shot: the protocol of the training-free papers, a dense read-out of the image tower,
80 prompt templates, windows of CLIP's size on the image resized to a short side of 336), with the names of
--classes (or --class-names FILE: one class a line, synonyms comma-separated). --serve starts a web page
(denseclip/run/web.py, `pip install -e ".[web]"`) where you upload an image, type class names and get the same
pictures.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from denseclip import build_model, inference
from denseclip.checkpoint import load_checkpoint, load_clip
from denseclip.configs import CONFIGS, config_names, config_overrides, task_of
from denseclip.data.image_io import IMAGE_SUFFIXES, read_image
from denseclip.data.options import MIN_SIDE, HelpFormatter, class_names_arg, name_list
from denseclip.data.transforms import normalize, rescale_size, resize_image, to_tensor
from denseclip.errors import ConfigError, DataError, MissingFileError, run_main, whole
from denseclip.language import name_tokens
from denseclip.progress import progress
from denseclip.run import visualize
from denseclip.run.checkpoints import saved_run
from denseclip.run.outputs import check_out_dir
from denseclip.run.zero_shot import PROTOCOL_SCALE, add_zero_shot_args, zero_shot_config, zero_shot_segmenter
from denseclip.zeroshot import ZeroShotSegmenter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint, official DenseCLIP .pth, or a (text-free) state dict; "
                                      "with --zero-shot an OpenAI CLIP file")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively; none with --serve)")
    p.add_argument("--out-dir", default="demo_out", help="the pictures go here, named after the images (an image "
                                                         "that cannot be read is skipped, and listed at the end)")
    # Every config name parses, so that a detector gets load_model's message (a detection model) rather than
    # argparse's list; the help names the segmentation configs only.
    p.add_argument("--model", choices=sorted(CONFIGS), metavar="NAME",
                   help="segmentation config (default: the checkpoint's; needed for official checkpoints); "
                        f"{config_names(('segmentation',))}")
    p.add_argument("--class-names", help="the model's training classes: a file (one per line) or 'a,b,c' "
                                         "(default: the checkpoint's, else ADE20K's 150)")
    p.add_argument("--classes", type=name_list, help="open vocabulary: segment with these names (comma-separated) by "
                                                     "the score map (default: the model's classes, by its decode head)")
    p.add_argument("--score-maps", type=name_list, help="comma-separated class names whose score maps to draw (any "
                                                        "names; default: none)")
    p.add_argument("--scale", type=whole(MIN_SIDE), nargs=2, metavar=("LONG", "SHORT"),
                   help="resize (keep ratio) to fit these bounds before inference, as the test transform (default: "
                        "the training data's; none for procedural-data models; 2048 512 for official ones; "
                        f"{' '.join(map(str, PROTOCOL_SCALE))} for --zero-shot)")
    p.add_argument("--no-resize", action="store_true", help="run at the image's own size")
    p.add_argument("--mode", choices=["whole", "slide"],
                   help="inference on the whole image or in sliding windows of the test crop (default: slide when "
                        "the image exceeds the model's test crop, else the config's test mode)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    add_zero_shot_args(p, evaluation=False)
    g = p.add_argument_group("web demo")
    g.add_argument("--serve", action="store_true", help="serve the model on a web page (Gradio) instead of writing "
                                                        "pictures: upload an image, type class names")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    g.add_argument("--port", type=whole(1, 65535), default=7860, help="port to serve on")
    args = p.parse_intermixed_args(argv)  # images may follow options, although none are needed with --serve
    if not args.images and not args.serve:
        p.error("give image files or folders, or --serve")
    return args


class ZeroShot:
    """Raw CLIP weights where demo.py expects a segmentor: a ZeroShotSegmenter (zeroshot.py) for the names asked
    for, whose ensembled text features are computed once per list of names (the last list is kept). cfg: the
    protocol's settings that do not depend on the names (windows, mode), for segment()."""

    def __init__(self, clip, class_names, args):
        self.clip, self.class_names, self.args = clip, list(class_names or []), args
        self.cfg = zero_shot_config(args, clip, self.class_names or ["background"])
        self.names, self.model = None, None

    def to(self, device):
        self.clip.to(device)
        return self

    def segmenter(self, names=None) -> ZeroShotSegmenter:
        names = list(names or self.class_names)
        if not names:
            raise ConfigError("zero-shot segmentation needs class names (--classes 'a,b,c')")
        if names != self.names:
            self.names, self.model = names, zero_shot_segmenter(self.args, names, clip=self.clip).eval()
        return self.model

    def predict(self, images, out_size=None, mode=None, names=None):
        return self.segmenter(names).predict(images, out_size=out_size, mode=mode)


def load_model(args, device):
    """(model, scale, title): the segmentor (or ZeroShot), the resize bounds of its test transform, and how the
    pictures name it."""
    names = class_names_arg(args.class_names) if args.class_names else None
    if args.zero_shot:
        classes = args.classes or names
        model = ZeroShot(load_clip(args.checkpoint), classes, args)
        title = (f"model zero-shot CLIP ({args.readout})", f"checkpoint {Path(args.checkpoint).name}")
        return model.to(device), None if args.no_resize else args.scale or PROTOCOL_SCALE, title
    run = saved_run(args.checkpoint)  # train.py's options and classes ({} for other files)
    saved, saved_names = run.get("args", {}), run.get("class_names")
    name = args.model or saved.get("model")
    if name is None:
        raise ConfigError(f"--model is required for checkpoints not written by train.py ({args.checkpoint} does "
                          "not say which config it is; an official one: e.g. --model denseclip_r50)")
    if task_of(name) != "segmentation":
        raise ConfigError(f"demo.py draws segmentations; {name} is a {task_of(name)} model (eval.py --show-dir draws "
                          "its detections)")
    overrides = config_overrides(saved.get("overrides", []) + args.overrides)
    model = build_model(name, names or saved_names, **overrides)
    report = load_checkpoint(model, args.checkpoint)
    if report.kind != "model":
        raise ConfigError(f"{args.checkpoint} holds {report.kind} weights, not a trained segmentor"
                          + ("; --zero-shot segments with them" if report.kind == "clip" else ""))
    scale = None if args.no_resize else args.scale
    if scale is None and not args.no_resize:
        dataset = saved.get("dataset")
        scale = None if dataset == "procedural" else saved.get("scale", [2048, 512])
    return model.to(device).eval(), scale, (f"model {name}", f"checkpoint {Path(args.checkpoint).name}")


def find_images(items, out_dir: Path) -> list:
    """[(image, the stem of its pictures under out_dir)]: every image file under the folders given, named by its
    path below that folder (a file given alone: by its name). Refused before anything is read or written: an input
    that does not exist, no images at all, two images that would write the same pictures, a picture that would
    replace an input image."""
    found = []
    for item in map(Path, items):
        if item.is_dir():
            found += [(p, p.relative_to(item)) for p in sorted(item.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise MissingFileError(f"{item}: no such file or folder")
    if not found:
        raise MissingFileError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, items))}")
    named, inputs = {}, {p.resolve() for p, _ in found}
    for path, rel in found:
        stem = out_dir / rel.with_suffix("")
        if stem in named:
            raise ConfigError(f"{named[stem]} and {path} would both be drawn as {stem}.png: give them in separate "
                              "runs (another --out-dir), or give their folder instead")
        named[stem] = path
        clash = [f for f in (f"{stem}.png", f"{stem}_label.png", f"{stem}_scores.png") if Path(f).resolve() in inputs]
        if clash:
            raise ConfigError(f"--out-dir {out_dir}: the picture {clash[0]} would replace an input image; pick "
                              "another --out-dir")
    return [(path, stem) for stem, path in named.items()]


def readable(path: Path, scale, skipped: list):
    """The photo at `path` as the datasets read it, or None after noting in `skipped` why it cannot be drawn: it
    does not decode, or is (after the --scale resize) under MIN_SIDE pixels on a side."""
    try:
        photo = read_image(path)  # the dataset's reader: the pixels eval.py feeds the model
    except DataError as e:
        skipped.append(f"{path} ({e.__cause__ or e})")
        return None
    H, W = photo.shape[:2]
    w, h = (W, H) if scale is None else rescale_size(W, H, tuple(scale))
    if min(w, h) < MIN_SIDE:
        skipped.append(f"{path} ({W}x{H} pixels{f', {w}x{h} at --scale {scale[0]} {scale[1]}' if scale else ''}: "
                       f"under {MIN_SIDE} on a side, the image encoder's stride; enlarge it or pass --scale)")
        return None
    return photo


def cosine_scores(model, names):
    """images (1, 3, h, w) -> the cosine score maps s of `names` (1, K', h, w) at the input size."""
    if isinstance(model, ZeroShot):
        segmenter: ZeroShotSegmenter = model.segmenter(names)
        return lambda x: segmenter.score_logits(x) * segmenter.cfg.tau  # each name's best synonym, a cosine
    return lambda x: model.score_logits(x, names=names) * model.cfg.tau  # s / τ, times τ


@torch.no_grad()
def segment(model, photo: np.ndarray, device, scale=None, mode=None, names=None, score_names=None):
    """(prediction (H, W) int64, scores (K', H, W) float or None) at the photo's size. names: open vocabulary
    (indices then refer to names); score_names: the classes whose cosine score maps to return."""
    H, W = photo.shape[:2]
    small = photo if scale is None else resize_image(to_tensor(photo), *rescale_size(W, H, tuple(scale)))  # uint8
    x = normalize(small)[None].to(device)  # (1, 3, h, w)
    crop = model.cfg.test_crop
    mode = mode or ("slide" if max(x.shape[-2:]) > crop else model.cfg.test_mode)
    pred = model.predict(x, out_size=(H, W), mode=mode, names=names)[0].argmax(0)  # (H, W)
    scores = None
    if score_names:
        forward = cosine_scores(model, score_names)
        cos = inference.slide_inference(forward, x, crop, model.cfg.test_stride) if mode == "slide" else forward(x)
        # (1, K', h, w) -> (K', H, W)
        scores = torch.nn.functional.interpolate(cos, size=(H, W), mode="bilinear", align_corners=False)[0]
    return pred.cpu().numpy(), None if scores is None else scores.cpu().numpy()


@dataclass
class Explained:
    """What the demo shows of one photo: the explained picture and its info (legend, view, title; see
    visualize.segmentation_picture), the prediction, and the score-map picture and its info (or None)."""
    picture: object
    info: dict
    pred: np.ndarray
    scores: Optional[object] = None
    score_info: Optional[dict] = None


def explain(model, photo: np.ndarray, device, title=(), scale=None, mode=None, names=None, score_names=None):
    """The pictures of one photo, for the files main writes and for the web demo. names equal to the model's own
    classes use its decode head (the trained path), other names the score map (open vocabulary)."""
    if names is not None and list(names) == list(model.class_names) and not isinstance(model, ZeroShot):
        names = None
    pred, scores = segment(model, photo, device, scale, mode, names, score_names)
    picture, info = visualize.segmentation_picture(photo, pred, names or model.class_names, title)
    out = Explained(picture, info, pred)
    if scores is not None:
        out.scores, value_range = visualize.score_picture(photo, scores, score_names)
        out.score_info = {"names": list(score_names), "range": list(value_range)}
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.serve:
        from denseclip.run import web
        web.import_gradio()  # before the model loads: a missing package is said at once
    else:  # where it writes, and what: before the model is loaded
        out_dir = check_out_dir(args.out_dir, "--out-dir")
        images = find_images(args.images, out_dir)
    model, scale, title = load_model(args, device)
    names, score_names = args.classes, args.score_maps
    for asked in (names, score_names) if not isinstance(model, ZeroShot) else ():
        if asked:
            name_tokens(model, asked)  # a name over the token budget (or a text-free model): before any image
    if args.serve:

        def show(path: str, typed, typed_score_names) -> Explained:
            return explain(model, read_image(path), device, (*title, f"image {Path(path).name}"), scale, args.mode,
                           typed or names, typed_score_names)
        return web.serve(show, ", ".join(names or model.class_names), " | ".join(title), args.host, args.port)
    written, skipped = [], []
    for path, stem in progress(images, "demo"):
        photo = readable(path, scale, skipped)
        if photo is None:
            continue
        shown = f"image {stem.relative_to(out_dir).as_posix()}{path.suffix}"  # its path below the folder given
        res = explain(model, photo, device, (*title, shown), scale, args.mode, names, score_names)
        visualize.save_png(res.picture, f"{stem}.png", **res.info)
        visualize.label_png(res.pred, len(names or model.class_names)).save(f"{stem}_label.png")
        written += [f"{stem}.png", f"{stem}_label.png"]
        if res.scores is not None:
            visualize.save_png(res.scores, f"{stem}_scores.png", **res.score_info)
            written.append(f"{stem}_scores.png")
    print(f"wrote {len(written)} file(s) for {len(images) - len(skipped)} image(s) to {out_dir}")
    if skipped:
        raise DataError(f"skipped {len(skipped)} of {len(images)} image(s) that cannot be drawn: " +
                        "; ".join(skipped[:10]) + (f"; ... ({len(skipped) - 10} more)" if len(skipped) > 10 else ""))
    return written


if __name__ == "__main__":
    run_main(main)
