"""Segmentation datasets on disk: ADE20K and user folders in mmseg's layout (images and class-index PNGs of the same
stem). The built-in procedural dataset is procedural.py.

Every dataset returns ``(image, label)``: a float32 (3, H, W) image normalised with CLIP's mean/std and an int64
(H, W) label in which 255 means "ignore". Each has ``class_names``.

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
from .classes import ADE20K_CLASSES
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


def read_class_names(class_names: Union[Sequence[str], str, Path]) -> list:
    """A list of names, or a text file with one name per line (blank lines skipped)."""
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise MissingFileError(f"class-name file {path} not found (expected one class name per line)")
        class_names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return check_class_names(class_names)


class FolderSegmentation(torch.utils.data.Dataset):
    """Images in `img_dir` with labels of the same relative path and stem in `ann_dir` (mmseg's CustomDataset)."""

    def __init__(self, img_dir, ann_dir, class_names, transform: Optional[Transform] = None, img_suffix=".jpg",
                 seg_suffix=".png", reduce_zero_label=False, seed: int = 0):
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        self.class_names = read_class_names(class_names)
        if len(self.class_names) > IGNORE_INDEX:
            raise ValueError(f"{len(self.class_names)} classes do not fit uint8 labels with {IGNORE_INDEX} = ignore")
        self.transform = transform if transform is not None else TestTransform()
        self.reduce_zero_label, self.seed, self.epoch = reduce_zero_label, seed, 0
        if not self.img_dir.is_dir():
            raise MissingFileError(f"image folder {self.img_dir} does not exist; see data/README.md for the layout")
        self.samples, no_label, _ = find_pairs(self.img_dir, self.ann_dir, img_suffix, seg_suffix)
        if no_label:
            raise MissingFileError(f"{len(no_label)} image(s) without an annotation in {self.ann_dir}, e.g. "
                                   f"{no_label[0]} (expected its label {self.ann_dir}/<same stem>{seg_suffix}); "
                                   "python -m denseclip.data.preflight lists them all")
        if not self.samples:
            raise MissingFileError(f"no '*{img_suffix}' images found under {self.img_dir}; "
                                   "see data/README.md for the expected layout")

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


class ADE20K(FolderSegmentation):
    """ADEChallengeData2016 in mmseg's layout; label 0 ("other") is ignored and 1..150 become 0..149."""

    def __init__(self, root="data/ade/ADEChallengeData2016", split: str = "training",
                 transform: Optional[Transform] = None, seed: int = 0):
        if split not in ("training", "validation"):
            raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
        if transform is None:
            transform = TrainTransform() if split == "training" else TestTransform()
        root = Path(root)
        super().__init__(root / "images" / split, root / "annotations" / split, list(ADE20K_CLASSES), transform,
                         reduce_zero_label=True, seed=seed)


