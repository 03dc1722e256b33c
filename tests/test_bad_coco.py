"""Bad COCO-format detection data fails in the pre-flight, before the model is built: a catalogue with one tiny tree
(test_coco.make_coco_dataset: 6 training and 3 validation images) per kind of problem. Each case checks that the
message names the file and counts the offenders, and that train.py wrote nothing and built no model. What the loader
copes with on its own (crowd, degenerate and out-of-image boxes) passes, and the check agrees with the loader on
what it reads: image sizes upright by EXIF, the training images that have a usable box."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import ROOT, refused  # noqa: E402
from test_coco import coco2017_layout, make_coco_dataset  # noqa: E402

import train  # noqa: E402  (repo root: on sys.path through test_bad_input)
from denseclip.data import preflight  # noqa: E402
from denseclip.data.coco import CocoDetection  # noqa: E402
from denseclip.errors import DataError, TrainingError, run_main  # noqa: E402

DET = ["--model", "retinanet_tiny", "--batch-size", "2", "--iters", "1", "--eval-interval", "0", "--workers", "0",
       "--set", "min_size=64", "--set", "max_size=107"]


@pytest.fixture
def coco(tmp_path):
    """(root, data options) of a clean COCO-format tree: root/train.json, root/val.json, root/images."""
    root = tmp_path / "data"
    return root, make_coco_dataset(root)


def edit(path: Path, change):
    """Rewrite a json file through change(dict)."""
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def train_refused(tmp_path, monkeypatch, argv, *names):
    """train.main on a detector stops with a DataError naming every one of `names`, before the model is built and
    without writing its run folder; returns the message."""
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    out = tmp_path / "run"
    msg = refused(DataError, [*DET, *argv, "--out-dir", str(out)], *names)
    assert not out.exists() and "nothing was trained" in msg
    return msg


def test_clean_tree_passes_and_says_what_the_loader_drops(coco, capsys):
    root, opts = coco
    edit(root / "train.json", lambda d: d["annotations"].append({**d["annotations"][0], "id": 999,
                                                                 "bbox": [70, 5, 4, 4]}))  # outside 64x64: dropped
    anns = json.loads((root / "train.json").read_text())["annotations"]
    unused = sum(a["iscrowd"] for a in anns) + 1
    for level in ("quick", "full"):
        summary = preflight.main([*opts, "--check-data", level])
        assert capsys.readouterr().out.strip() == summary
        assert summary.startswith(f"data pre-flight ({level}): train 6 images (4 with a usable box; {unused} of "
                                  f"{len(anns)} annotations unused: crowd, degenerate or outside the image), val 3 "
                                  "images, 7 categories OK"), summary


def test_the_coco_2017_layout_under_data_root(tmp_path):
    make_coco_dataset(tmp_path / "src")
    root = coco2017_layout(tmp_path / "src", tmp_path / "coco")
    argv = ["--dataset", "coco", "--data-root", str(root)]
    assert " OK " in preflight.main(argv)
    (root / "val2017/val_2.png").unlink()
    refused(DataError, argv, "1 val image(s) listed in", str(root / "annotations/instances_val2017.json"),
            str(root / "val2017/val_2.png"), script=preflight)


def test_missing_annotation_file_and_image_folder_are_reported_together(coco, tmp_path, monkeypatch):
    root, opts = coco
    (root / "train.json").unlink()
    opts[opts.index("--val-images") + 1] = str(root / "nowhere")
    train_refused(tmp_path, monkeypatch, opts, "2 missing file(s) or folder(s)", str(root / "train.json"),
                  str(root / "nowhere"), "data/README.md")


def test_invalid_json_and_missing_lists_name_the_file(coco, tmp_path, monkeypatch):
    root, opts = coco
    (root / "train.json").write_text('{"images": [')
    edit(root / "val.json", lambda d: d.pop("categories"))
    train_refused(tmp_path, monkeypatch, opts, "2 unusable annotation file(s)",
                  f"{root / 'train.json'} is not valid JSON", f"{root / 'val.json'} has no 'categories' list")


def test_entries_without_the_fields_the_loader_or_cocoeval_reads(coco, tmp_path, monkeypatch):
    root, opts = coco

    def break_train(d):
        del d["annotations"][0]["bbox"]
        d["annotations"][3]["bbox"] = [1, 2, 3]
        del d["images"][4]["height"]
        d["images"][5]["width"] = "64"

    edit(root / "train.json", break_train)
    edit(root / "val.json", lambda d: [a.pop("area") for a in d["annotations"]])
    n_val = len(json.loads((root / "val.json").read_text())["annotations"])
    train_refused(tmp_path, monkeypatch, opts, f"{root / 'train.json'}:\n",
                  "1 of its 6 images: height missing (the first: image id 1028)",
                  "1 of its 6 images: width not a positive whole number of pixels (the first: image id 1035: width "
                  "'64')", "annotations: bbox missing (the first: annotation id 1)",
                  "annotations: bbox not 4 finite numbers [x, y, width, height] (the first: annotation id 4: bbox "
                  "[1, 2, 3])", f"{root / 'val.json'}: {n_val} of its {n_val} annotations: area missing")
    with pytest.raises(DataError, match="val.json"):  # the loader says the same when the check is off
        CocoDetection(root / "images", root / "val.json")


def test_listed_images_missing_under_the_image_folder(coco, tmp_path, monkeypatch):
    root, opts = coco
    for name in ("train_0.png", "train_3.png", "train_1.png", "val_2.png"):
        (root / "images" / name).unlink()
    msg = train_refused(tmp_path, monkeypatch, opts, f"2 train image(s) listed in {root / 'train.json'} but missing "
                        f"under {root / 'images'}", "train_0.png", "train_3.png", "1 val image(s) listed in",
                        "val_2.png")
    assert "train_1.png" not in msg  # no annotations: training never reads it


def test_json_size_is_checked_against_the_upright_image_as_the_loader_reads_it(coco, tmp_path, monkeypatch):
    root, opts = coco
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, shown (and loaded) upright as 48x64
    Image.new("RGB", (64, 48)).save(root / "images/turned.jpg", exif=exif.tobytes())

    def stored_size(d):
        d["images"][0].update(file_name="turned.jpg", width=64, height=48)
        for a in d["annotations"]:
            if a["image_id"] == d["images"][0]["id"]:
                del a["segmentation"]  # its masks are those of the 64x64 image it replaces

    edit(root / "val.json", stored_size)
    edit(root / "train.json", lambda d: d["images"][0].update(width=65))
    train_refused(tmp_path, monkeypatch, opts, "2 image(s) whose size differs from their annotation file",
                  f"{root / 'images/turned.jpg'} is 48x64 (upright) but {root / 'val.json'} says 64x48",
                  f"{root / 'images/train_0.png'} is 64x64 (upright) but {root / 'train.json'} says 65x64")
    with pytest.raises(ValueError, match="turned.jpg"):  # the loader agrees
        CocoDetection(root / "images", root / "val.json")[0]
    edit(root / "val.json", lambda d: d["images"][0].update(width=48, height=64))
    edit(root / "train.json", lambda d: d["images"][0].update(width=64))
    assert " OK " in preflight.main([*opts, "--check-data", "quick"])
    assert CocoDetection(root / "images", root / "val.json")[0][0].shape == (3, 64, 48)


def test_annotations_with_unknown_image_or_category_ids(coco, tmp_path, monkeypatch):
    root, opts = coco

    def unknown(d):
        d["annotations"][0]["image_id"], d["annotations"][1]["image_id"] = 5, 6
        d["annotations"][2]["category_id"] = 99

    edit(root / "train.json", unknown)
    train_refused(tmp_path, monkeypatch, opts, f"2 train annotation(s) in {root / 'train.json'} whose image_id "
                  "is not in its images", "image_id 5", "image_id 6",
                  f"1 train annotation(s) in {root / 'train.json'} whose category_id is not in its categories",
                  "category_id 99")


def test_duplicate_ids_and_annotation_id_0(coco, tmp_path, monkeypatch):
    root, opts = coco

    def duplicate(d):
        d["images"][2]["id"] = d["images"][1]["id"]
        d["annotations"][1]["id"] = d["annotations"][0]["id"]
        d["annotations"][2]["id"] = 0

    edit(root / "val.json", duplicate)
    train_refused(tmp_path, monkeypatch, opts, f"1 duplicate image id(s) in {root / 'val.json'}",
                  f"1 duplicate annotation id(s) in {root / 'val.json'}", "1 annotation(s) with id 0 in")


def test_train_and_val_categories_must_be_equal(coco, tmp_path, monkeypatch):
    root, opts = coco

    def other_classes(d):
        d["categories"][0]["name"] = "kitten"
        d["categories"].append({"id": 100, "name": "blob"})

    edit(root / "val.json", other_classes)
    cat = json.loads((root / "train.json").read_text())["categories"][0]
    train_refused(tmp_path, monkeypatch, opts, f"2 category id(s) that differ between {root / 'train.json'} and "
                  f"{root / 'val.json'}", "id 100: only in validation ('blob')",
                  f"id {cat['id']}: {cat['name']!r} in training, 'kitten' in validation")


def test_too_few_training_images_and_an_empty_validation_set(coco, tmp_path, monkeypatch):
    root, opts = coco
    edit(root / "val.json", lambda d: d.update(images=[], annotations=[]))
    train_refused(tmp_path, monkeypatch, [*opts, "--batch-size", "8"],
                  "4 training images with a usable box make no micro-batch of 8", "--batch-size",
                  "empty validation split", str(root / "val.json"))


def test_corrupt_images_need_the_full_check(coco, tmp_path, monkeypatch):
    root, opts = coco
    png = root / "images/train_3.png"
    png.write_bytes(png.read_bytes()[:-200])  # the header survives, the pixels do not
    assert " OK " in preflight.main([*opts, "--check-data", "quick"])
    msg = train_refused(tmp_path, monkeypatch, [*opts, "--check-data", "full"], "1 corrupt image(s)", str(png))
    assert str(refused(DataError, opts, str(png), script=preflight)) == msg  # the command decodes by default


# --------------------------------------------------------------------------- the catalogue, field by field
# Each case: a tiny COCO 2017 tree (annotations/instances_{train,val}2017.json, {train,val}2017/), one json edited,
# train.py's main run at the command line's rule (errors.run_main): exit status 2, `error: ...` naming the json,
# the id and the field, the model never built and no run folder written. The ids are make_coco_dataset's: image i
# of the training json is 1000 + 7 i (validation: + 1), annotations count from 1, category k is 3 k + 2.
def crowd(d) -> dict:
    """The first crowd annotation (its segmentation is RLE, as COCO stores crowds)."""
    return next(a for a in d["annotations"] if a["iscrowd"])


def tall_image(d, root, split):
    """Image 0 becomes a 300x2 strip: the detector's resize (min_size 64, max_size 107) leaves it 0.71 px high."""
    Image.new("RGB", (300, 2)).save(root / f"{split}2017/strip.png")
    d["images"][0].update(file_name="strip.png", width=300, height=2)
    for a in d["annotations"]:
        if a["image_id"] == d["images"][0]["id"]:
            a.update(bbox=[0, 0, 100, 2], segmentation=[[0, 0, 100, 0, 100, 2, 0, 2]])


NAN, INF = float("nan"), float("inf")  # json.dumps writes them as NaN and Infinity, which json.load reads back
RETINA, MASKS, TEXT = "retinanet_tiny", "maskrcnn_tiny", "retinanet_denseclip_tiny"
CATALOGUE = {  # id: (split, edit(d, root, split) or raw file text, model, words the message must hold)
    # images
    "image id a string": ("train", lambda d, r, s: d["images"][0].update(id="1000"), RETINA,
                          ["images[0]: id '1000'", "not an integer"]),
    "image id fractional": ("val", lambda d, r, s: d["images"][0].update(id=1001.5), RETINA,
                            ["images[0]: id 1001.5", "not an integer"]),
    "image id a list": ("train", lambda d, r, s: d["images"][2].update(id=[1014]), RETINA, ["images[2]: id [1014]"]),
    "image id true": ("train", lambda d, r, s: d["images"][1].update(id=True), RETINA, ["images[1]: id True"]),
    "image id too large": ("train", lambda d, r, s: d["images"][0].update(id=2 ** 70), RETINA,
                           [f"images[0]: id {2 ** 70}", "2^53"]),
    "image width a string": ("train", lambda d, r, s: d["images"][0].update(width="64"), RETINA,
                             ["image id 1000: width '64'", "positive whole number"]),
    "image height 0": ("val", lambda d, r, s: d["images"][1].update(height=0), RETINA, ["image id 1008: height 0"]),
    "file_name absolute": ("train", lambda d, r, s: d["images"][0].update(file_name=str(r / "train2017/train_0.png")),
                           RETINA, ["image id 1000: file_name", "train_0.png", "is absolute"]),
    "file_name climbs out": ("val", lambda d, r, s: d["images"][0].update(file_name="../train2017/train_0.png"),
                             RETINA, ["image id 1001: file_name '../train2017/train_0.png'", "climbs out"]),
    "file_name climbs out inside": ("train", lambda d, r, s: d["images"][3].update(file_name="a/../../x.png"),
                                    RETINA, ["image id 1021: file_name 'a/../../x.png'", "climbs out"]),
    "file_name a number": ("train", lambda d, r, s: d["images"][0].update(file_name=7), RETINA,
                           ["image id 1000: file_name 7", "not a non-empty string"]),
    "file_name with NUL": ("train", lambda d, r, s: d["images"][0].update(file_name="a\0.png"), RETINA,
                           ["image id 1000: file_name", "NUL"]),
    "image too elongated": ("train", tall_image, RETINA, ["strip.png: 300x2", "too elongated", "min_size 64"]),
    # annotations
    "bbox NaN": ("train", lambda d, r, s: d["annotations"][0].update(bbox=[NAN, 1, 5, 5]), RETINA,
                 ["annotation id 1: bbox [nan, 1, 5, 5]", "not 4 finite numbers"]),
    "bbox Infinity": ("val", lambda d, r, s: d["annotations"][1].update(bbox=[1, 1, INF, 5]), RETINA,
                      ["annotation id 2: bbox [1, 1, inf, 5]"]),
    "bbox of 3": ("train", lambda d, r, s: d["annotations"][0].update(bbox=[1, 2, 3]), RETINA,
                  ["annotation id 1: bbox [1, 2, 3]"]),
    "bbox of strings": ("train", lambda d, r, s: d["annotations"][0].update(bbox=["1", "2", "3", "4"]), RETINA,
                        ["annotation id 1: bbox ['1', '2', '3', '4']"]),
    "bbox negative width": ("train", lambda d, r, s: d["annotations"][0].update(bbox=[30, 30, -10, 5]), RETINA,
                            ["annotation id 1: bbox [30, 30, -10, 5]", "negative width or height"]),
    "image_id null": ("train", lambda d, r, s: d["annotations"][0].update(image_id=None), RETINA,
                      ["annotation id 1: image_id None"]),
    "category_id a string": ("val", lambda d, r, s: d["annotations"][0].update(category_id="5"), RETINA,
                             ["annotation id 1: category_id '5'"]),
    "iscrowd a word": ("train", lambda d, r, s: d["annotations"][0].update(iscrowd="no"), RETINA,
                       ["annotation id 1: iscrowd 'no'", "not 0 or 1"]),
    "area NaN": ("val", lambda d, r, s: d["annotations"][0].update(area=NAN), RETINA, ["annotation id 1: area nan"]),
    "no segmentation, training": ("train", lambda d, r, s: d["annotations"][0].pop("segmentation"), MASKS,
                                  ["annotation id 1 (image id 1000)", "without a segmentation", "trains on"]),
    "no segmentation, validation": ("val", lambda d, r, s: crowd(d).pop("segmentation"), MASKS,
                                    ["without a segmentation", "is scored on (segm AP)"]),
    "polygon of odd length": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]),
                              RETINA, ["annotation id 1 (image id 1000): polygon 0 is [1, 2, 3, 4, 5]", "even"]),
    "polygon of 4 (a box?)": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=[[1, 2, 30, 40]]),
                              RETINA, ["annotation id 1 (image id 1000): polygon 0 is [1, 2, 30, 40]", "6 or more"]),
    "polygon with NaN": ("val", lambda d, r, s: d["annotations"][0].update(segmentation=[[1, 2, 3, NAN, 5, 6]]),
                         RETINA, ["annotation id 1 (image id 1001): polygon 0 holds NaN"]),
    "polygon of strings": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=[["1", 2, 3, 4, 5, 6]]),
                           RETINA, ["annotation id 1", "holds something other than numbers"]),
    "polygon far off": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=[[0, 0, 1e9, 0, 1e9, 9]]),
                        RETINA, ["annotation id 1", "reaches 1e+09", "64x64 image", "crashes"]),
    "no polygons": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=[]), RETINA,
                    ["annotation id 1", "an empty polygon list"]),
    "segmentation a number": ("train", lambda d, r, s: d["annotations"][0].update(segmentation=5), RETINA,
                              ["annotation id 1", "5 is neither polygons"]),
    "RLE of another size": ("val", lambda d, r, s: crowd(d)["segmentation"].update(size=[32, 64]), RETINA,
                            ["RLE size [32, 64] is not its image's [height, width] = [64, 64]"]),
    "RLE runs short": ("train", lambda d, r, s: crowd(d)["segmentation"].update(counts=[100, 5]), RETINA,
                       ["RLE counts [100, 5] are not runs covering its 64 x 64 = 4096 pixels"]),
    "RLE string garbage": ("train", lambda d, r, s: crowd(d)["segmentation"].update(counts="!!!!"), RETINA,
                           ["RLE counts '!!!!' are not runs"]),
    # categories
    "category id a string": ("train", lambda d, r, s: d["categories"][0].update(id="20"), RETINA,
                             ["categories[0]: id '20'"]),
    "category name a number": ("train", lambda d, r, s: d["categories"][0].update(name=5), RETINA,
                               ["category id 20: name 5", "not a string"]),
    "category name empty": ("val", lambda d, r, s: d["categories"][0].update(name=" "), RETINA,
                            ["categories with id(s) [20] have an empty name"]),
    "category names repeat": ("train", lambda d, r, s: d["categories"][0].update(name=d["categories"][1]["name"]),
                              RETINA, ["the json's categories repeat the name(s)", "(ids 17, 20)"]),
    "category name over the token budget": (
        "both", lambda d, r, s: d["categories"][0].update(name="a rhombicosidodecahedron"), TEXT,
        ["category id 20: 'a rhombicosidodecahedron' needs 12 tokens", "class_token_length 5"]),
    # files
    "not JSON": ("train", '{"images": [', RETINA, ["is not valid JSON"]),
    "nested too deep": ("val", "[" * 100000 + "]" * 100000, RETINA, ["is nested too deeply to parse"]),
    "a list, not an object": ("train", "[]", RETINA, ["has no 'images' / 'annotations' / 'categories' list"]),
    "validation without annotations": ("val", lambda d, r, s: d.update(annotations=[]), RETINA,
                                       ["none of the 3 images evaluated has a non-crowd annotation", "AP -1"]),
    "validation with crowds only": ("val", lambda d, r, s: [a.update(iscrowd=1) for a in d["annotations"]], RETINA,
                                    ["without annotations to score"]),
}


def coco_tree(tmp_path) -> Path:
    make_coco_dataset(tmp_path / "src")
    return coco2017_layout(tmp_path / "src", tmp_path / "coco")


def at_the_command_line(main, argv, capsys):
    """main(argv) under errors.run_main, as the scripts run it: (exit status, stderr). Anything but a UserError
    propagates (a traceback at the command line) and fails the test."""
    with pytest.raises(SystemExit) as info:
        run_main(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue_of_bad_coco_fields(case, tmp_path, monkeypatch, capsys):
    split, change, model, words = CATALOGUE[case]
    root = coco_tree(tmp_path)
    for s in ("train", "val") if split == "both" else (split,):
        path = root / f"annotations/instances_{s}2017.json"
        if isinstance(change, str):
            path.write_text(change)
        else:
            edit(path, lambda d, s=s: change(d, root, s))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    out = tmp_path / "run"
    code, err = at_the_command_line(train.main, [*DET, "--model", model, "--dataset", "coco", "--data-root",
                                                 str(root), "--out-dir", str(out)], capsys)
    assert code == 2 and err.startswith("error: data pre-flight (quick) found problems"), err
    json_file = root / f"annotations/instances_{'train' if split == 'both' else split}2017.json"
    for word in [str(json_file), *words]:
        assert word in err, (word, err)
    assert not out.exists()


@pytest.mark.parametrize("command,edit_val", [
    (["train.py", "--model", "maskrcnn_tiny"], lambda d: d["annotations"][0].update(segmentation=[[1, 2, 30, 40]])),
    (["-m", "denseclip.data.preflight"], lambda d: d["images"][0].update(file_name="../../secret.png")),
])
def test_the_command_line_exits_2_naming_the_culprit_without_a_traceback(tmp_path, command, edit_val):
    root = coco_tree(tmp_path)
    edit(root / "annotations/instances_val2017.json", edit_val)
    argv = [*command, "--dataset", "coco", "--data-root", str(root)]
    if command[0] == "train.py":
        argv = [str(ROOT / "train.py"), *argv[1:], "--out-dir", str(tmp_path / "run")]
    out = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert str(root / "annotations/instances_val2017.json") in out.stderr and "image id 1001" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_nan_from_the_data_names_the_image_it_came_from(coco, tmp_path, monkeypatch):
    """The loader refuses NaN boxes in a json; one made later (a dataset or transform of your own) reaches the loss,
    and the stop names the image."""
    root, opts = coco
    annotations = CocoDetection.annotations

    def nan_box(self, image_id):
        boxes, labels, anns = annotations(self, image_id)
        return (boxes * float("nan") if image_id == 1021 else boxes), labels, anns

    monkeypatch.setattr(CocoDetection, "annotations", nan_box)
    refused(TrainingError, [*DET, *opts, "--global-batch", "4", "--out-dir", str(tmp_path / "run")],
            "non-finite loss at iteration 1", "loss_bbox nan",
            f"the data is the cause: image id 1021 ({root / 'images/train_3.png'}): boxes hold NaN/inf")


def test_full_runs_the_loader_as_training_reads_it_masks_included(coco, tmp_path, monkeypatch):
    root, opts = coco
    to_mask = COCO.annToMask

    def broken(self, ann):  # what pycocotools might trip on that the quick checks do not see
        if ann["image_id"] == 1028:
            raise ValueError("Invalid RLE mask representation")
        return to_mask(self, ann)

    monkeypatch.setattr(COCO, "annToMask", broken)
    assert " OK " in preflight.main([*opts, "--model", "maskrcnn_tiny", "--check-data", "quick"])
    assert " OK " in preflight.main([*opts, "--model", "retinanet_tiny"])  # no masks read: nothing fails
    refused(DataError, [*opts, "--model", "maskrcnn_tiny"], "1 image(s) the loader fails on",
            f"image id 1028 ({root / 'images/train_4.png'}): ValueError: Invalid RLE mask representation",
            script=preflight)
