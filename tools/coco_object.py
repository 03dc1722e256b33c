"""Write COCO-Object's labels (81 classes: background and COCO's 80 things) from COCO-Stuff 164k's stored label maps,
as the training-free papers build the benchmark (GroupViT's convert_coco_object.py, used by TCL, SCLIP, ClearCLIP and
NACLIP): every thing category keeps its class, 1..80 in COCO's order; every stuff category and the unlabeled pixels
(255) become background (0), so COCO-Object has no ignored pixels. The lookup is layouts.coco_object_map.

    python tools/coco_object.py --data-root data/coco_stuff164k

reads annotations/{train2017,val2017}/<stem>.png (stuffthingmaps_trainval2017.zip unzipped there, as mmseg's
dataset_prepare.md says) and writes <stem>_instanceTrainIds.png next to each, the files `--dataset coco_object`
reads (mmseg's converted <stem>_labelTrainIds.png, read by `--dataset coco_stuff`, are left alone). Existing outputs
are rewritten. The COCO-Stuff maps themselves come from COCO's instance annotations (things) and COCO-Stuff's
(stuff); building COCO-Object from the instance json alone would differ where instances overlap.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from denseclip.data.layouts import LAYOUTS, coco_object_map
from denseclip.errors import DataError, MissingFileError, run_main, whole
from denseclip.progress import progress

SUFFIX = LAYOUTS["coco_object"].seg_suffix  # _instanceTrainIds.png


def stored_maps(ann_dir: Path) -> list:
    """COCO-Stuff's own label maps in one folder: <stem>.png, not the converted *TrainIds.png files."""
    return sorted(p for p in ann_dir.glob("*.png") if "TrainIds" not in p.name)


def convert(path: Path, lookup: np.ndarray) -> Path:
    """One stored map -> its COCO-Object label next to it; returns the file written."""
    try:
        with Image.open(path) as im:
            stored = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read label {path}: {e}") from e
    if stored.ndim != 2 or stored.dtype != np.uint8:
        raise DataError(f"{path} is not a single-channel 8-bit label map ({stored.shape}, {stored.dtype}): "
                        "expected COCO-Stuff 164k's stuffthingmaps")
    out = path.with_name(path.stem + SUFFIX)
    Image.fromarray(lookup[stored]).save(out)  # (H, W) uint8 0..80
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=LAYOUTS["coco_object"].root, help="COCO-Stuff 164k in mmseg's layout")
    p.add_argument("--workers", type=whole(1), default=8, help="files converted in parallel")
    args = p.parse_args(argv)
    layout = LAYOUTS["coco_object"]
    folders = [Path(args.data_root) / part.ann_dir for part in (*layout.train, *layout.val)]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise MissingFileError(f"label folder(s) {', '.join(missing)} not found; unzip stuffthingmaps_trainval2017.zip "
                               "into annotations/ (data/README.md)")
    lookup, total = coco_object_map(), 0
    with ThreadPoolExecutor(args.workers) as pool:
        for folder in folders:
            files = stored_maps(folder)
            if not files:
                raise MissingFileError(f"no COCO-Stuff label maps (<stem>.png) in {folder}")
            done = pool.map(lambda f: convert(f, lookup), files)
            total += sum(1 for _ in progress(done, f"convert {folder.name}", total=len(files)))
    print(f"wrote {total} COCO-Object labels (*{SUFFIX}) under {args.data_root}/annotations")
    return total


if __name__ == "__main__":
    run_main(main)
