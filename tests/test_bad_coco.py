"""Bad COCO-format detection data fails in the pre-flight, before the model is built: a catalogue with one tiny tree
(test_coco.make_coco_dataset: 6 training and 3 validation images) per kind of problem. Each case checks that the
message names the file and counts the offenders, and that train.py wrote nothing and built no model. What the loader
copes with on its own (crowd, degenerate and out-of-image boxes) passes, and the check agrees with the loader on
what it reads: image sizes upright by EXIF, the training images that have a usable box."""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import refused  # noqa: E402
from test_coco import coco2017_layout, make_coco_dataset  # noqa: E402

import train  # noqa: E402  (repo root: on sys.path through test_bad_input)
from denseclip.data import preflight  # noqa: E402
from denseclip.data.coco import CocoDetection  # noqa: E402
from denseclip.errors import DataError  # noqa: E402

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
