"""The mmseg-layout datasets (denseclip/data/layouts.py): for each, a tiny tree in the exact layout (folders, split
files, file suffixes, stored label values with 255 and background / label 0, the files of other splits and other
label kinds beside them), checked for class count and names, the label mapping, the background flag, one training
step and one evaluation (train.main), and the pre-flight; COCO-Object's labels through tools/coco_object.py."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
import train
from denseclip.data import classes
from denseclip.data.layouts import LAYOUTS
from denseclip.data.preflight import main as preflight
from denseclip.data.segmentation import LayoutSegmentation
from denseclip.data.transforms import TestTransform
from denseclip.errors import DataError, MissingFileError
from denseclip.run.zero_shot import has_background

ROOT = Path(__file__).resolve().parents[1]
W, H = 48, 32
SHORT = ["--model", "denseclip_tiny", "--iters", "1", "--batch-size", "2", "--global-batch", "2", "--crop-size", "32",
         "--scale", "48", "32", "--eval-interval", "0", "--workers", "0", "--set", "test_mode=whole"]

# name -> (stored label values, what the dataset reads them as, class count, first name, last name, background)
FACTS = {
    "ade20k": ([0, 1, 150, 255], [255, 0, 149, 255], 150, "wall", "flag", False),
    "voc21": ([0, 1, 20, 255], [0, 1, 20, 255], 21, "background", "tvmonitor", True),
    "voc21aug": ([0, 1, 20, 255], [0, 1, 20, 255], 21, "background", "tvmonitor", True),
    "voc20": ([0, 1, 20, 255], [255, 0, 19, 255], 20, "aeroplane", "tvmonitor", False),
    "context60": ([0, 1, 59, 255], [0, 1, 59, 255], 60, "background", "wood", True),
    "context59": ([0, 1, 59, 255], [255, 0, 58, 255], 59, "aeroplane", "wood", False),
    "coco_stuff": ([0, 80, 170, 255], [0, 80, 170, 255], 171, "person", "wood", False),
    # COCO-Object's stored values are COCO-Stuff's raw maps here, turned into labels by tools/coco_object.py:
    # person (0) -> 1, toothbrush (89) -> 80, stuff banner (91) and wood (181) -> background, unlabeled 255 -> 0
    "coco_object": ([0, 89, 91, 181, 255], [1, 80, 0, 0, 0], 81, "background", "toothbrush", True),
    "cityscapes": ([0, 5, 18, 255], [0, 5, 18, 255], 19, "road", "bicycle", False),
}


def label_image(values, seed: int) -> np.ndarray:
    """(H, W) uint8 of vertical bands of `values`, shifted by seed so the two images differ."""
    return np.asarray(values, dtype=np.uint8)[(np.arange(W) // (W // len(values)) + seed) % len(values)][None] \
        .repeat(H, axis=0)


def save_label(path: Path, label: np.ndarray, palette: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label)
    if palette:  # VOC's and Context's stored labels are palette PNGs: the indices are the classes
        im = im.convert("P")
        im.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
        im.putdata(label.ravel().tolist())
    im.save(path)


def write_pair(img: Path, ann: Path, values, seed: int, palette=False):
    img.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img)
    save_label(ann, label_image(values, seed), palette)


def write_layout(name: str, root: Path, values) -> Path:
    """Two images per split part in `name`'s layout under root, plus the files of other splits and label kinds that
    the real trees hold beside them (which the reader must leave alone)."""
    layout = LAYOUTS[name]
    raw = name == "coco_object"  # its labels come from the converter
    for split in ("train", "val"):
        for p, part in enumerate(layout.train if split == "train" else layout.val):
            stems = [f"{split}{p}_{i}" for i in range(2)]
            if name == "cityscapes":  # one sub-folder per city, as leftImg8bit/ and gtFine/ hold them
                stems = [f"aachen/aachen_00000{i}_0000{p}9" for i in range(2)]
            for i, stem in enumerate(stems):
                suffix = ".png" if raw else layout.seg_suffix
                write_pair(root / part.img_dir / f"{stem}{layout.img_suffix}", root / part.ann_dir / f"{stem}{suffix}",
                           values, i, palette=name.startswith(("voc", "context")))
            if part.split_file:
                (root / part.split_file).parent.mkdir(parents=True, exist_ok=True)
                (root / part.split_file).write_text("\n".join(stems) + "\n")
                write_pair(root / part.img_dir / f"test_{split}{layout.img_suffix}", root / "unused.png", values, 7)
    if name == "cityscapes":  # the other label kinds cityscapesScripts writes
        stem = root / "gtFine/val/aachen/aachen_000000_000009"
        save_label(Path(f"{stem}_gtFine_labelIds.png"), label_image([7, 33], 0), False)
        Image.new("RGB", (W, H)).save(f"{stem}_gtFine_color.png")
    if name == "coco_stuff":  # COCO-Stuff's own maps beside mmseg's converted ones
        save_label(root / "annotations/val2017/val0_0.png", label_image([91, 181], 0), False)
    return root


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", sorted(FACTS))
def test_layout_reads_trains_and_evaluates(name, tmp_path):
    stored, read, count, first, last, background = FACTS[name]
    root = write_layout(name, tmp_path / name, stored)
    if name == "coco_object":
        assert load_script("tools/coco_object.py")(["--data-root", str(root), "--workers", "1"]) == 4
    val = LayoutSegmentation(name, root, "val", TestTransform(scale=(48, 32)))
    assert len(val.class_names) == count and (val.class_names[0], val.class_names[-1]) == (first, last)
    assert val.background is background and len(val) == 2
    assert has_background(val) is background  # what the zero-shot protocol reads (its background threshold)
    assert not any(Path(img).name.startswith("test_") for img, _ in val.samples)  # split files: only the listed stems
    label = val[0][1].numpy()  # (H, W) as read: the test transform resizes only the image
    expected = label_image(read, 0)
    np.testing.assert_array_equal(label, expected)
    train_set = LayoutSegmentation(name, root, "train")
    assert len(train_set) == 2 * len(LAYOUTS[name].train)  # VOC aug: train.txt + aug.txt, as mmseg concatenates them
    res = train.main(["--dataset", name, "--data-root", str(root), *SHORT, "--out-dir", str(tmp_path / "run")])
    assert 0.0 <= res["mIoU"] <= 1.0 and len(res["IoU"]) == count
    # eval.py on the run's checkpoint: the dataset and its root come from the checkpoint, --dataset NAME repeats it
    again = eval_script.main([str(tmp_path / "run/iter_000001.pt"), "--dataset", name, "--data-root", str(root),
                              "--scale", "48", "32", "--workers", "0"])
    assert again["mIoU"] == pytest.approx(res["mIoU"])
    assert "pairs OK" in preflight(["--dataset", name, "--data-root", str(root)])


def test_class_names_are_mmseg_and_the_papers():
    assert len(set(classes.COCO_STUFF_CLASSES)) == 171 and classes.COCO_STUFF_CLASSES[:80] == classes.COCO_CLASSES
    assert LAYOUTS["context60"].class_names[1:] == LAYOUTS["context59"].class_names == classes.CONTEXT59_CLASSES
    assert LAYOUTS["voc21"].class_names[1:] == LAYOUTS["voc20"].class_names
    assert [n for n, layout in LAYOUTS.items() if layout.background] == ["voc21", "voc21aug", "context60",
                                                                         "coco_object"]
    assert all(layout.class_names[0] == "background" for layout in LAYOUTS.values() if layout.background)


def test_split_file_problems_are_named(tmp_path):
    root = write_layout("voc21", tmp_path / "voc", FACTS["voc21"][0])
    (root / "SegmentationClass/val0_1.png").unlink()
    with pytest.raises(MissingFileError, match="label.*listed in .*val.txt"):
        LayoutSegmentation("voc21", root, "val")
    with pytest.raises(DataError, match=r"(?s)label\(s\) of listed images missing.*val0_1\.png"):
        preflight(["--dataset", "voc21", "--data-root", str(root)])
    (root / "ImageSets/Segmentation/train.txt").unlink()
    with pytest.raises(MissingFileError, match="split file .*train.txt not found"):
        LayoutSegmentation("voc21", root, "train")


def test_label_values_outside_the_classes_are_named(tmp_path):
    root = write_layout("voc20", tmp_path / "voc", [0, 21])  # 21 -> 20 after reduce_zero_label: one too many
    with pytest.raises(DataError, match=r"values \[20\] outside 0..19"):
        LayoutSegmentation("voc20", root, "val")[0]
    with pytest.raises(DataError, match="after --reduce-zero-label"):
        preflight(["--dataset", "voc20", "--data-root", str(root)])
