"""The one image reader of the project: datasets, pre-flight, evaluation and the demo all decode images here, so
every entry point feeds the model the same pixels. Labels (class-index PNGs) are read here too.
No OpenCV: Pillow decodes, with OpenCV's IMREAD_COLOR conventions (mmseg's loader) reproduced."""
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from .transforms import IGNORE_INDEX


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held (1 = upright, 5..8 = quarter turns)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # what counts as an image file


def oriented_size(im: Image.Image) -> Tuple[int, int]:
    """(width, height) of an opened, not decoded, image once turned upright; only the header is read."""
    w, h = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1) if "exif" in im.info else 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB, as mmseg's loader (OpenCV's IMREAD_COLOR) reads it: turned upright by the EXIF
    orientation, grey and palette images expanded to RGB, alpha dropped, 16-bit values cut to their high byte.
    A file that cannot be decoded is an error naming it, never a skipped sample."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: OpenCV keeps the high byte (>> 8)
                grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}; replace or remove the file "
                        "(python -m denseclip.data.preflight --check-data full lists every such file)") from e


def read_label(path: Path, reduce_zero_label: bool, num_classes: int) -> np.ndarray:
    """Class-index map (H, W) as stored (no EXIF turn: mmseg reads labels 'unchanged'); with reduce_zero_label
    0 -> 255 and k -> k-1 (mmseg's uint8 arithmetic)."""
    try:
        with Image.open(path) as im:
            label = np.asarray(im)  # palette ('P'), grey and 16-bit PNGs all give the stored indices
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read label {path}: {e}; replace or remove the file") from e
    if label.ndim != 2:
        raise DataError(f"label {path} has shape {label.shape}; expected a single-channel (H, W) class-index PNG "
                        "(grey or palette), not a colour picture")
    label = label.astype(np.int64)
    if reduce_zero_label:
        label = np.where((label == 0) | (label == 255), 255, label - 1)
    bad = ((label >= num_classes) & (label != IGNORE_INDEX)) | (label < 0)
    if bad.any():
        raise DataError(f"label {path} has values {np.unique(label[bad])[:10].tolist()} outside 0..{num_classes - 1}"
                        f" and {IGNORE_INDEX} (ignore); check the class names and --reduce-zero-label")
    return label.astype(np.uint8)
