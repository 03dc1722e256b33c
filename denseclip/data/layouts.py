"""The segmentation datasets in the folder layouts people already have (mmseg's), as one table of facts read by one
reader (segmentation.FolderSegmentation): where the images and labels of each split are, their file suffixes, the
split files that list a split's stems, whether label 0 is dropped (reduce_zero_label), whether class 0 is a
'background' class, the class names, and mmseg's training recipe for that dataset. data/README.md shows each
layout as a tree.

Mirrors mmseg's dataset classes (mmseg/datasets/{ade,voc,pascal_context,coco_stuff,cityscapes}.py and their
configs/_base_/datasets/*.py), and for VOC20, Context59 and COCO-Object the dataset classes of the training-free
papers (SCLIP's / NACLIP's custom_datasets.py: VOC20 and Context59 are reduce_zero_label, their background
ignored; COCO-Object keeps a background class). One table instead of a module per dataset: what differs between
them is data, not code. Labels are read as stored and 255 is ignored everywhere; label maps that need a pass over
the files are converters (mmseg's tools/dataset_converters; tools/coco_object.py for COCO-Object).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_CLASSES, COCO_STUFF_CLASSES, CONTEXT59_CLASSES, \
    VOC_CLASSES


@dataclass(frozen=True)
class Part:
    """One folder pair of a split, relative to the data root: images, labels of the same stem, and the split file
    listing the stems to use (None: every image in img_dir, sub-folders included)."""
    img_dir: str
    ann_dir: str
    split_file: Optional[str] = None


@dataclass(frozen=True)
class Recipe:
    """mmseg's training recipe for the dataset (configs/_base_/datasets and the schedules of its model zoo)."""
    crop: Tuple[int, int]  # (H, W) training crop
    scale: Tuple[int, int]  # (long, short) resize bound of training (x U(0.5, 2)) and test images
    iters: str  # the schedules mmseg reports on it
    batch: str  # images per GPU x GPUs


@dataclass(frozen=True)
class Layout:
    root: str  # the default --data-root (mmseg's data_root)
    class_names: Tuple[str, ...]
    train: Tuple[Part, ...]  # concatenated, as mmseg's list-valued ann_dir / split (VOC aug)
    val: Tuple[Part, ...]
    recipe: Recipe
    img_suffix: str = ".jpg"
    seg_suffix: str = ".png"
    reduce_zero_label: bool = False  # stored 0 -> 255 (ignored), k -> k - 1
    background: bool = False  # class 0 is 'background' (the zero-shot protocol's low-confidence class)


VOC, CONTEXT, STUFF = "data/VOCdevkit/VOC2012", "data/VOCdevkit/VOC2010", "data/coco_stuff164k"
VOC_TRAIN = Part("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt")
VOC_VAL = Part("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt")
VOC_AUG = Part("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation/aug.txt")  # mmseg's voc_aug.py output
CONTEXT_TRAIN = Part("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt")
CONTEXT_VAL = Part("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt")
STUFF_TRAIN = Part("images/train2017", "annotations/train2017")
STUFF_VAL = Part("images/val2017", "annotations/val2017")
VOC_RECIPE = Recipe((512, 512), (2048, 512), "20k / 40k (with aug)", "4 x 4")
CONTEXT_RECIPE = Recipe((480, 480), (520, 520), "40k / 80k", "4 x 4")
STUFF_RECIPE = Recipe((512, 512), (2048, 512), "80k / 160k", "4 x 4")

LAYOUTS = {
    "ade20k": Layout("data/ade/ADEChallengeData2016", ADE20K_CLASSES,
                     (Part("images/training", "annotations/training"),),
                     (Part("images/validation", "annotations/validation"),),
                     Recipe((512, 512), (2048, 512), "80k / 160k (DenseCLIP: 80k at 4 x 8)", "4 x 4"),
                     reduce_zero_label=True),
    "voc21": Layout(VOC, ("background",) + VOC_CLASSES, (VOC_TRAIN,), (VOC_VAL,), VOC_RECIPE, background=True),
    "voc21aug": Layout(VOC, ("background",) + VOC_CLASSES, (VOC_TRAIN, VOC_AUG), (VOC_VAL,), VOC_RECIPE,
                       background=True),
    "voc20": Layout(VOC, VOC_CLASSES, (VOC_TRAIN,), (VOC_VAL,), VOC_RECIPE, reduce_zero_label=True),
    "context60": Layout(CONTEXT, ("background",) + CONTEXT59_CLASSES, (CONTEXT_TRAIN,), (CONTEXT_VAL,),
                        CONTEXT_RECIPE, background=True),
    "context59": Layout(CONTEXT, CONTEXT59_CLASSES, (CONTEXT_TRAIN,), (CONTEXT_VAL,), CONTEXT_RECIPE,
                        reduce_zero_label=True),
    "coco_stuff": Layout(STUFF, COCO_STUFF_CLASSES, (STUFF_TRAIN,), (STUFF_VAL,), STUFF_RECIPE,
                         seg_suffix="_labelTrainIds.png"),
    "coco_object": Layout(STUFF, ("background",) + COCO_CLASSES, (STUFF_TRAIN,), (STUFF_VAL,), STUFF_RECIPE,
                          seg_suffix="_instanceTrainIds.png", background=True),
    "cityscapes": Layout("data/cityscapes", CITYSCAPES_CLASSES, (Part("leftImg8bit/train", "gtFine/train"),),
                         (Part("leftImg8bit/val", "gtFine/val"),),
                         Recipe((512, 1024), (2048, 1024), "40k / 80k", "2 x 4"),
                         img_suffix="_leftImg8bit.png", seg_suffix="_gtFine_labelTrainIds.png"),
}


def coco_object_map() -> np.ndarray:
    """(256,) uint8 lookup from COCO-Stuff 164k's stored label values (stuffthingmaps: COCO category id - 1, 0..181,
    255 unlabeled) to COCO-Object's: the 80 thing categories -> 1..80 in COCO_CLASSES order, every stuff category
    and the unlabeled 255 -> 0 (background), as GroupViT's convert_coco_object.py that SCLIP, ClearCLIP and NACLIP
    use. The 11 category ids COCO never used map to 255 (they do not occur)."""
    stored = np.full(256, 255, dtype=np.uint8)
    unused = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}  # COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91
    things = [v for v in range(91) if v not in unused]  # (80,) stored values of the thing classes, in id order
    stored[things] = np.arange(1, 81)
    stored[91:182] = 0
    stored[255] = 0
    return stored
