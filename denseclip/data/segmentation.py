"""Segmentation datasets on disk: user folders and the datasets of layouts.py (ADE20K, Pascal VOC, Pascal Context,
COCO-Stuff, COCO-Object, Cityscapes) in mmseg's layouts, all read by one reader (FolderSegmentation: images and
class-index PNGs of the same stem, optionally the stems of a split file). The built-in procedural dataset is
procedural.py.

Every dataset returns ``(image, label)``: a float32 (3, H, W) image normalised with CLIP's mean/std and an int64
(H, W) label in which 255 means "ignore". Each has ``class_names`` and ``background`` (True when class 0 is a
'background' class, which the zero-shot protocol fills with low-confidence pixels).

Randomness is reproducible and resumable: all random draws for one sample come from
``np.random.default_rng([seed, epoch, index])`` (transforms.sample_rng), so a sample is bit-identical in any process,
DataLoader worker, or after a resume. Call ``set_epoch`` on the dataset before building the epoch's iterator
(with ``persistent_workers=True`` the workers keep the epoch they were started with).
The training and test transforms (mmseg's pipeline) are in transforms.py, the image and label reader in image_io.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..configs import check_class_names
from ..errors import DataError, MissingFileError
from .layouts import LAYOUTS
from .image_io import read_image, read_label
from .transforms import IGNORE_INDEX, TestTransform, TrainTransform, Transform, sample_rng


def find_pairs(img_dir: Path, ann_dir: Path, img_suffix: str, seg_suffix: str):
    """Match images and labels by relative path and stem. Returns (pairs [(image, label)], images without a
    label, labels without an image), each sorted; every file with the suffix is accounted for."""
    images = sorted(p.relative_to(img_dir).as_posix() for p in img_dir.rglob(f"*{img_suffix}") if p.is_file())
    labels = {p.relative_to(ann_dir).as_posix() for p in ann_dir.rglob(f"*{seg_suffix}") if p.is_file()} \
        if ann_dir.is_dir() else set()
    pairs, no_label = [], []
    for rel in images:
        ann = rel[: -len(img_suffix)] + seg_suffix
        if ann in labels:
            pairs.append((img_dir / rel, ann_dir / ann))
            labels.discard(ann)
        else:
            no_label.append(img_dir / rel)
    return pairs, no_label, sorted(ann_dir / rel for rel in labels)


def read_split_file(path: Path) -> list:
    """The stems a split file lists, one a line (mmseg's ann_file: each line stripped, blank lines skipped)."""
    if not path.is_file():
        raise MissingFileError(f"split file {path} not found (it lists the split's image stems, one a line); "
                               "see data/README.md for the layout")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def listed_pairs(img_dir: Path, ann_dir: Path, img_suffix: str, seg_suffix: str, stems):
    """The (image, label) pairs of the stems a split file lists; returns (pairs, image paths missing, label
    paths missing). Other files in the folders (the other splits') are not looked at."""
    pairs, no_image, no_label = [], [], []
    for stem in stems:
        img, ann = img_dir / f"{stem}{img_suffix}", ann_dir / f"{stem}{seg_suffix}"
        if not img.is_file():
            no_image.append(img)
        elif not ann.is_file():
            no_label.append(ann)
        else:
            pairs.append((img, ann))
    return pairs, no_image, no_label


def read_class_names(class_names: Union[Sequence[str], str, Path]) -> list:
    """A list of names, or a text file with one name per line (blank lines skipped)."""
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise MissingFileError(f"class-name file {path} not found (expected one class name per line)")
        class_names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return check_class_names(class_names)


class FolderSegmentation(torch.utils.data.Dataset):
    """Images in `img_dir` with labels of the same relative path and stem in `ann_dir` (mmseg's CustomDataset);
    split_file: only the stems it lists (mmseg's ann_file / split); background: class 0 is 'background'."""

    def __init__(self, img_dir, ann_dir, class_names, transform: Optional[Transform] = None, img_suffix=".jpg",
                 seg_suffix=".png", reduce_zero_label=False, seed: int = 0, split_file=None, background=False):
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        self.class_names = read_class_names(class_names)
        if len(self.class_names) > IGNORE_INDEX:
            raise ValueError(f"{len(self.class_names)} classes do not fit uint8 labels with {IGNORE_INDEX} = ignore")
        self.transform = transform if transform is not None else TestTransform()
        self.reduce_zero_label, self.background, self.seed, self.epoch = reduce_zero_label, background, seed, 0
        self.img_suffix, self.seg_suffix = img_suffix, seg_suffix
        self.samples = self.find(self.img_dir, self.ann_dir, split_file)

    def find(self, img_dir: Path, ann_dir: Path, split_file=None) -> list:
        """The sorted (image, label) pairs of one folder pair, or of the stems its split file lists (in the file's
        order); an image without a label (or a listed stem without either) is an error."""
        if not img_dir.is_dir():
            raise MissingFileError(f"image folder {img_dir} does not exist; see data/README.md for the layout")
        if split_file is not None:
            pairs, no_image, no_label = listed_pairs(img_dir, ann_dir, self.img_suffix, self.seg_suffix,
                                                     read_split_file(Path(split_file)))
            for missing, what in ((no_image, "image"), (no_label, "label")):
                if missing:
                    raise MissingFileError(f"{len(missing)} {what}(s) listed in {split_file} not found, e.g. "
                                           f"{missing[0]}; python -m denseclip.data.preflight lists them all")
        else:
            pairs, no_label, _ = find_pairs(img_dir, ann_dir, self.img_suffix, self.seg_suffix)
            if no_label:
                raise MissingFileError(f"{len(no_label)} image(s) without an annotation in {ann_dir}, e.g. "
                                       f"{no_label[0]} (expected its label {ann_dir}/<same stem>{self.seg_suffix}); "
                                       "python -m denseclip.data.preflight lists them all")
        if not pairs:
            raise MissingFileError(f"no '*{self.img_suffix}' images found under {img_dir}"
                                   f"{f' for the stems of {split_file}' if split_file else ''}; "
                                   "see data/README.md for the expected layout")
        return pairs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        label = read_label(ann_path, self.reduce_zero_label, len(self.class_names))
        if image.shape[:2] != label.shape:
            raise DataError(f"image {img_path} is {image.shape[:2]} but its label {ann_path} is {label.shape}")
        return self.transform(image, label, sample_rng(self.seed, self.epoch, index))


class LayoutSegmentation(FolderSegmentation):
    """A dataset of layouts.LAYOUTS (`name`: 'voc21', 'cityscapes', ...) under `root` (default: the layout's,
    mmseg's data_root); split 'train' or 'val'. A split of several parts (VOC aug) is their concatenation."""

    def __init__(self, name: str, root=None, split: str = "train", transform: Optional[Transform] = None,
                 seed: int = 0, class_names=None):
        if split not in ("train", "val"):
            raise ValueError(f"{name} split must be 'train' or 'val', got {split!r}")
        layout, self.name = LAYOUTS[name], name
        root = Path(root or layout.root)
        first, *rest = layout.train if split == "train" else layout.val
        split_file = lambda part: root / part.split_file if part.split_file else None  # noqa: E731
        if transform is None:
            transform = TrainTransform() if split == "train" else TestTransform()
        super().__init__(root / first.img_dir, root / first.ann_dir, list(class_names or layout.class_names),
                         transform, layout.img_suffix, layout.seg_suffix, layout.reduce_zero_label, seed,
                         split_file(first), layout.background)
        for part in rest:
            self.samples += self.find(root / part.img_dir, root / part.ann_dir, split_file(part))


class ADE20K(LayoutSegmentation):
    """ADEChallengeData2016 in mmseg's layout; label 0 ("other") is ignored and 1..150 become 0..149."""

    def __init__(self, root="data/ade/ADEChallengeData2016", split: str = "training",
                 transform: Optional[Transform] = None, seed: int = 0):
        if split not in ("training", "validation"):
            raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
        super().__init__("ade20k", root, "train" if split == "training" else "val", transform, seed)
