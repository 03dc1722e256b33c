"""Run a trained DenseCLIP segmentor on your own images and write pictures.

    python demo.py runs/demo/iter_003000.pt photos/ --out-dir demo_out                  # our checkpoint
    python demo.py runs/demo/iter_003000.pt a.jpg --score-maps circle,star              # + score-map picture
    python demo.py runs/demo/iter_003000.pt a.jpg --classes "disc,box,ring"             # open vocabulary
    python demo.py denseclip_fpn_res50.pth a.jpg --model denseclip_r50                  # official checkpoint

For each image (a file, or every image under a folder) it writes, under --out-dir and named after the image:
  NAME.png          the prediction blended over the photo, with a legend (colour + name) of the classes present
  NAME_label.png    the raw prediction: a palette PNG whose pixel values are the class indices
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
"""
import argparse
import functools
from pathlib import Path

import numpy as np
import torch

from denseclip import build_model, inference
from denseclip.checkpoint import load_checkpoint
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint, official DenseCLIP .pth, or a (text-free) state dict")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
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
                        "the training data's; none for procedural-data models; 2048 512 for official ones)")
    p.add_argument("--no-resize", action="store_true", help="run at the image's own size")
    p.add_argument("--mode", choices=["whole", "slide"],
                   help="inference on the whole image or in sliding windows of the test crop (default: slide when "
                        "the image exceeds the model's test crop, else the config's test mode)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def load_model(args, device):
    run = saved_run(args.checkpoint)  # train.py's options and classes ({} for other files)
    saved, saved_names = run.get("args", {}), run.get("class_names")
    name = args.model or saved.get("model")
    if name is None:
        raise ConfigError(f"--model is required for checkpoints not written by train.py ({args.checkpoint} does "
                          "not say which config it is; an official one: e.g. --model denseclip_r50)")
    if task_of(name) != "segmentation":
        raise ConfigError(f"demo.py draws segmentations; {name} is a {task_of(name)} model (eval.py --show-dir draws "
                          "its detections)")
    names = class_names_arg(args.class_names) if args.class_names else saved_names
    overrides = config_overrides(saved.get("overrides", []) + args.overrides)
    model = build_model(name, names, **overrides)
    report = load_checkpoint(model, args.checkpoint)
    if report.kind != "model":
        raise ConfigError(f"{args.checkpoint} holds {report.kind} weights, not a trained segmentor")
    scale = None if args.no_resize else args.scale
    if scale is None and not args.no_resize:
        dataset = saved.get("dataset")
        scale = None if dataset == "procedural" else saved.get("scale", [2048, 512])
    return model.to(device).eval(), scale


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
        forward = functools.partial(model.score_logits, names=score_names)  # s / τ at the input size
        logits = inference.slide_inference(forward, x, crop, model.cfg.test_stride) if mode == "slide" else forward(x)
        scores = torch.nn.functional.interpolate(logits * model.cfg.tau, size=(H, W), mode="bilinear",
                                                 align_corners=False)[0]  # (K', H, W) cosine
    return pred.cpu().numpy(), None if scores is None else scores.cpu().numpy()


def main(argv=None):
    args = parse_args(argv)
    out_dir = check_out_dir(args.out_dir, "--out-dir")  # where it writes, and what: before the model is loaded
    images = find_images(args.images, out_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, scale = load_model(args, device)
    names, score_names = args.classes, args.score_maps
    for asked in (names, score_names):
        if asked:
            name_tokens(model, asked)  # a name over the token budget (or a text-free model): before any image
    class_names = names or model.class_names
    pal = visualize.palette()
    written, skipped = [], []
    for path, stem in progress(images, "demo"):
        photo = readable(path, scale, skipped)
        if photo is None:
            continue
        pred, scores = segment(model, photo, device, scale, args.mode, names, score_names)
        picture, legend = visualize.prediction_picture(photo, pred, class_names, pal)
        visualize.save_png(picture, f"{stem}.png", legend=legend)
        visualize.label_png(pred, pal).save(f"{stem}_label.png")
        written.append(f"{stem}.png")
        if scores is not None:
            picture, value_range = visualize.score_picture(photo, scores, score_names)
            visualize.save_png(picture, f"{stem}_scores.png", names=score_names, range=value_range)
    print(f"wrote {len(written)} picture(s) to {out_dir}")
    if skipped:
        raise DataError(f"skipped {len(skipped)} of {len(images)} image(s) that cannot be drawn: " +
                        "; ".join(skipped[:10]) + (f"; ... ({len(skipped) - 10} more)" if len(skipped) > 10 else ""))
    return written


if __name__ == "__main__":
    run_main(main)
