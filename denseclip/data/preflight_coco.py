"""The data pre-flight of COCO-format detection data (`--dataset coco`): every field the loader (coco.py), the
detector and COCOeval will read, checked before the first step and reported together. The driver, the segmentation
checks and the command are in preflight.py, whose docstring says when each level runs.

quick (the scripts' default; COCO 2017's 118k + 5k images in well under a minute, see bench/README.md):
- each json as the loader reads it (coco.read_coco_json): valid JSON of sane depth, the three lists, every field
  read present and of a usable kind (integer ids, positive integer sizes, 4 finite box numbers, a file_name that
  stays inside the image folder, string category names), each kind counted with the first offender by id;
- per annotation: its image and category exist, no id repeats (pycocotools keeps the last), no validation
  annotation has id 0 (COCOeval's "no match"), no box of negative width or height (corners [x1, y1, x2, y2]
  written where COCO's [x, y, width, height] belongs?), its `segmentation` well-formed where present (polygons
  of an even count >= 6 of finite numbers within an image size of the image, as pycocotools misreads 4 numbers
  as a box and crashes on far-off points; RLE of its image's size whose runs cover exactly its pixels), and
  present where Mask R-CNN reads it (training: the boxes it trains on; validation: every annotation, COCOeval's
  segm AP reads them all);
- per category: names neither empty nor repeated (coco.category_names), within the text encoder's class-token
  budget (class_token_length) for a model with language; training and validation categories equal;
- per image the loader reads (training: those with a usable box; validation: all): the file exists with the
  json's width x height (from its header, EXIF orientation applied), and the detector's keep-ratio resize
  (min_size / max_size) leaves it at least a pixel on each side (an extreme aspect ratio otherwise crashes in
  the resize, mid-run);
- enough training images for one micro-batch, and a validation set with at least one annotation to score
  (COCOeval reports AP -1, printed -100, without one).
full: also every image through the loader itself, as training and evaluation will read it (decoded; Mask R-CNN's
training images with their instance masks): whatever it fails on is named with its image id, file and error.
Crowd, degenerate (under a pixel) and out-of-image boxes are no error: the loader drops or clips them, as mmdet;
the summary counts them.

The model the data is checked for is --model with its --set overrides (class_token_length, min_size, max_size,
Mask R-CNN); the standalone command without --model checks for a DenseCLIP RetinaNet's defaults.
No upstream counterpart: mmdet reads nothing before the first iteration.
"""
import math
from collections import Counter
from dataclasses import replace
from typing import Optional

from PIL import Image

from ..configs import CONFIGS, DetectionConfig, config_overrides
from ..errors import DataError
from ..progress import progress
from ..tokenizer import token_count
from . import coco, image_io
from .options import coco_files


def detector_config(args) -> DetectionConfig:
    """The detector the data is checked for: --model's config with --set; a DenseCLIP RetinaNet's without one."""
    model = getattr(args, "model", None)
    cfg = CONFIGS[model]() if model in CONFIGS else DetectionConfig()
    return replace(cfg, **config_overrides(getattr(args, "overrides", None) or [], type(cfg)))


def rle_runs(text: str) -> Optional[list]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString: 5 bits per character from '0',
    continuation bit 0x20, sign bit 0x10, each run after the second stored as the change from two runs back), or
    None when the string is not one."""
    runs, p = [], 0
    while p < len(text):
        x = k = 0
        while True:
            c = ord(text[p]) - 48 if p < len(text) else -1
            if not 0 <= c < 64:
                return None  # a character outside the alphabet, or the string ends mid-number
            x, p, k = x | (c & 0x1F) << 5 * k, p + 1, k + 1
            if not c & 0x20:
                x -= (1 << 5 * k) if c & 0x10 else 0  # negative: sign-extend
                break
        runs.append(x + (runs[-2] if len(runs) > 2 else 0))
    return runs


def segmentation_problem(segm, width: int, height: int) -> Optional[str]:
    """What is wrong with an annotation's `segmentation` for an image of width x height, or None. pycocotools
    reads a polygon of 4 numbers as a box and decodes RLE runs that do not cover the image into garbage pixels
    (reading past its buffer), so both are refused here rather than trained on."""
    if isinstance(segm, list):
        if not segm:
            return "an empty polygon list"
        for i, poly in enumerate(segm):
            if type(poly) is not list or len(poly) < 6 or len(poly) % 2:
                return (f"polygon {i} is {coco.SHOWN.repr(poly)}: polygons are lists [x1, y1, x2, y2, ...] of an "
                        "even count of numbers, 6 or more")
            try:
                total = sum(poly)  # one C loop: a string, null or list inside is a TypeError
            except TypeError:
                return f"polygon {i} holds something other than numbers: {coco.SHOWN.repr(poly)}"
            if not math.isfinite(total):
                return f"polygon {i} holds NaN or infinite numbers: {coco.SHOWN.repr(poly)}"
            side = max(width, height)  # x and y together: two C loops, not four
            if min(poly) < -side or max(poly) > 2 * side:
                return (f"polygon {i} reaches {max(poly, key=abs):.4g}, more than an image size outside its "
                        f"{width}x{height} image (pycocotools crashes rasterising far-off points)")
        return None
    if not isinstance(segm, dict):
        return f"{coco.SHOWN.repr(segm)} is neither polygons (a list) nor RLE (an object with size and counts)"
    size, counts = segm.get("size"), segm.get("counts")
    if size != [height, width]:
        return f"RLE size {coco.SHOWN.repr(size)} is not its image's [height, width] = [{height}, {width}]"
    runs = rle_runs(counts) if isinstance(counts, str) else counts if isinstance(counts, list) and \
        all(type(r) is int for r in counts) else None
    if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
        return (f"RLE counts {coco.SHOWN.repr(counts)} are not runs covering its {height} x {width} = "
                f"{height * width} pixels")
    return None


def _listed(path, size, ann, missing: str, cfg):
    """(kind, message) of the first problem of an image listed in `ann` with `size` (w, h), seen from its header
    and the detector's resize, or None."""
    w, h = size
    scale = min(cfg.min_size / min(w, h), cfg.max_size / max(w, h))  # torchvision's GeneralizedRCNNTransform
    if math.floor(min(w, h) * scale) < 1:  # its interpolate would be asked for an empty image
        return (f"image(s) in {ann} too elongated for the detector's resize (min_size {cfg.min_size}, max_size "
                f"{cfg.max_size}): crop them or leave them out of the json",
                f"{path}: {w}x{h} would be resized to {w * scale:.3g}x{h * scale:.3g}, under one pixel")
    try:
        with Image.open(path) as im:
            upright = image_io.oriented_size(im)
    except FileNotFoundError:
        return missing, path
    except (OSError, ValueError, SyntaxError) as e:
        return "unreadable image(s)", f"{path}: {e}"
    if upright != tuple(size):
        return ("image(s) whose size differs from their annotation file",
                f"{path} is {upright[0]}x{upright[1]} (upright) but {ann} says {w}x{h}")
    return None


def _load(dataset, index: int):
    """(kind, message) when the loader fails on sample `index` as a run would read it, else None."""
    image_id = dataset.ids[index]
    try:
        dataset[index]
    except Exception as e:  # whatever a run would trip on (Pillow, pycocotools, the loader): named, not raised
        if isinstance(e, DataError) and e.__cause__ is not None:  # read_image: the file does not decode
            return "corrupt image(s)", f"{dataset.image_file(image_id)}: {e.__cause__}"
        return ("image(s) the loader fails on", f"image id {image_id} ({dataset.image_file(image_id)}): "
                f"{type(e).__name__}: {e}")
    return None


def check_annotations(name: str, dataset, ann, cfg, findings) -> None:
    """The per-annotation checks of one split (see the module docstring)."""
    gt = dataset.coco
    masks_read = set()  # the annotations Mask R-CNN reads the segmentation of
    if cfg.detector == "maskrcnn":
        masks_read = {a["id"] for i in dataset.ids for a in dataset.annotations(i)[2]} if name == "train" else \
            {a["id"] for a in gt.dataset["annotations"] if a["image_id"] in gt.imgs}
    for a in gt.dataset["annotations"]:
        for key, known, where in (("image_id", gt.imgs, "images"), ("category_id", gt.cats, "categories")):
            if a[key] not in known:  # the loader never sees it: an annotation silently lost
                findings.add(f"{name} annotation(s) in {ann} whose {key} is not in its {where}",
                             f"annotation id {a['id']}: {key} {a[key]}")
        if a["id"] == 0 and name == "val":
            findings.add(f"annotation(s) with id 0 in {ann} (COCOeval reads id 0 as 'no match': a detection "
                         "matched to it would count as a false positive)", f"annotation id 0 (image id "
                         f"{a['image_id']})")
        if min(a["bbox"][2:]) < 0:
            findings.add(f"annotation(s) in {ann} whose bbox has a negative width or height (COCO boxes are "
                         "[x, y, width, height]: corners [x1, y1, x2, y2]?)", f"annotation id {a['id']}: bbox "
                         f"{a['bbox']}")
        if "segmentation" in a and a["image_id"] in gt.imgs:
            image = gt.imgs[a["image_id"]]
            why = segmentation_problem(a["segmentation"], image["width"], image["height"])
            if why:
                findings.add(f"annotation(s) in {ann} whose segmentation pycocotools would misread",
                             f"annotation id {a['id']} (image id {a['image_id']}): {why}")
        elif a["id"] in masks_read:
            findings.add(f"{name} annotation(s) in {ann} without a segmentation, which Mask R-CNN "
                         f"{'trains on' if name == 'train' else 'is scored on (segm AP)'}",
                         f"annotation id {a['id']} (image id {a['image_id']})")
    for key, what in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        for i, n in Counter(e["id"] for e in gt.dataset[key]).items():
            if n > 1:
                findings.add(f"duplicate {what} id(s) in {ann} (pycocotools keeps only the last)", f"id {i}: {n}x")


def check_coco_split(name: str, files, args, cfg, findings, pool):
    """Check one split of COCO-format data; add what is wrong to `findings`; return its dataset as the loader
    builds it (coco.CocoDetection), or None when it cannot be built."""
    images, ann = files
    for path, what, ok in ((ann, "annotation file", ann.is_file()), (images, "image folder", images.is_dir())):
        if not ok:
            findings.add("missing file(s) or folder(s)", f"{path} ({name} {what}); see data/README.md for the layout")
    if not (ann.is_file() and images.is_dir()):
        return None
    try:
        dataset = coco.CocoDetection(images, ann, train=name == "train", masks=name == "train" and
                                     cfg.detector == "maskrcnn")
    except DataError as e:  # not JSON, no images / annotations / categories, fields missing or unusable
        findings.add("unusable annotation file(s)", e)
        return None
    check_annotations(name, dataset, ann, cfg, findings)
    gt = dataset.coco
    jobs = [(dataset.image_file(i), (gt.imgs[i]["width"], gt.imgs[i]["height"])) for i in dataset.ids]
    lost = f"{name} image(s) listed in {ann} but missing under {images}"
    headers = list(progress(pool.map(lambda job: _listed(*job, ann, lost, cfg), jobs), f"scan {name}",
                            total=len(jobs)))
    for problem in filter(None, headers):
        findings.add(*problem)
    evaluated = dataset.ids[:args.val_size or None] if name == "val" else []
    if evaluated and not any(not a.get("iscrowd", 0) and a["category_id"] in dataset.label_of
                             for i in evaluated for a in gt.imgToAnns[i]):
        findings.add("validation set(s) without annotations to score (COCOeval would report AP -1, printed -100)",
                     f"{ann}: none of the {len(evaluated)} images evaluated has a non-crowd annotation")
    if args.check_data == "full":  # through the loader, as the run reads them; files whose header failed are reported
        readable = [k for k, problem in enumerate(headers) if problem is None]
        for problem in progress(pool.map(lambda k: _load(dataset, k), readable), f"load {name}", total=len(readable)):
            if problem:
                findings.add(*problem)
    return dataset


def check_categories(sets: dict, files: dict, cfg, findings) -> dict:
    """Training and validation categories equal; names within the class-token budget. Returns {split: {id:
    name}}."""
    cats = {s: {c: x["name"] for c, x in d.coco.cats.items()} for s, d in sets.items() if d is not None}
    if len(cats) == 2:
        a, b = cats["train"], cats["val"]
        for c in sorted(a.keys() | b.keys()):
            if a.get(c) != b.get(c):
                findings.add(f"category id(s) that differ between {files['train'][1]} and {files['val'][1]} (the "
                             "model would be scored on classes it did not learn)",
                             f"id {c}: {a[c]!r} in training, {b[c]!r} in validation" if c in a and c in b else
                             f"id {c}: only in {'training' if c in a else 'validation'} ({a.get(c, b.get(c))!r})")
    if cfg.use_text and not cfg.truncate_class_names and cats:
        split, names = next(iter(cats.items()))
        for c, n in sorted(names.items()):
            if token_count(n) > cfg.class_token_length:
                findings.add(f"category name(s) in {files[split][1]} longer than the text encoder's class-token "
                             f"budget (class_token_length {cfg.class_token_length}: start + name + end tokens); "
                             "shorten them, or --set class_token_length=N, or --set truncate_class_names=True",
                             f"category id {c}: {n!r} needs {token_count(n)} tokens")
    return cats


def check_coco(args, min_train: int, splits, findings, pool) -> str:
    """Check --dataset coco (see the module docstring); return the summary's counts."""
    cfg = detector_config(args)
    files = {split: coco_files(args, split) for split in splits}
    sets = {s: check_coco_split(s, files[s], args, cfg, findings, pool) for s in splits}
    train, val = sets.get("train"), sets.get("val")
    if train is not None and len(train) < min_train:
        findings.add("too few training samples", f"{len(train)} training images with a usable box make no "
                     f"micro-batch of {min_train} (--batch-size x processes); lower --batch-size or add data")
    if val is not None and len(val) == 0:
        findings.add("empty validation split", f"no images in {files['val'][1]}")
    cats = check_categories(sets, files, cfg, findings)
    if findings:
        return ""  # the driver raises
    counts = []
    for split, dataset in sets.items():
        counts.append(f"{split} {len(dataset.coco.imgs)} images")
        if split == "train":  # what the loader drops or clips is no error: counted with its own rule
            n = len(dataset.coco.anns)
            unused = n - sum(len(dataset.annotations(i)[2]) for i in dataset.coco.imgs)
            counts[-1] += (f" ({len(dataset)} with a usable box; {unused} of {n} annotations unused: crowd, "
                           "degenerate or outside the image)")
    what = "every image loaded" if args.check_data == "full" else "files and sizes from headers"
    model = getattr(args, "model", None) or "a DenseCLIP RetinaNet's defaults (no --model)"
    return ", ".join(counts) + f", {len(next(iter(cats.values())))} categories OK ({what}; for {model})"
