"""Where the scripts write, checked before any work: an output folder or file that cannot be written fails in the
first second (not after an hour of evaluation), a run folder that holds another run is not mixed into, and a
picture named after an input path stays inside the folder it is written to.

    check_out_dir(path, option)      train.py --out-dir, eval.py --show-dir, demo.py --out-dir: a folder (or none yet)
    check_out_file(path, option)     eval.py --out, tools/plot_log.py --out: a file in an existing, writable folder
    check_new_run(out_dir, resume)   train.py: a folder with another run's log.jsonl or checkpoints needs --resume
    inside(name)                     a relative name from data (a COCO file_name) that cannot climb out

Writability is tried, not guessed from permission bits (which say nothing for root or a read-only mount): a
temporary file is made in the nearest existing folder and removed at once. Nothing else is created here: a run
refused later still leaves no folder behind.

No upstream counterpart: mmseg / mmdet fail on the first write, after the work.
"""
import os
import tempfile
from pathlib import Path, PurePath, PurePosixPath

from ..errors import ConfigError, OutputError


def _existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def _writable(folder: Path, option: str, path) -> None:
    """OutputError naming the option unless a file can be made in the existing folder `folder`."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"{option} {path}: cannot write in {folder} ({e.strerror or e}); pick a folder you can "
                          "write to") from None


def check_out_dir(path, option: str) -> Path:
    """`path` as a Path, after making sure it is a folder, or can become one, that this process can write in."""
    path = Path(path)
    base = _existing(path)
    if not base.is_dir():
        where = "is a file" if base == Path(os.path.abspath(path)) else f"is inside {base}, which is a file"
        raise OutputError(f"{option} {path} {where}, not a folder: pick a folder (it is made if missing)")
    _writable(base, option, path)
    return path


def check_out_file(path, option: str, keep=(), make_folder: bool = False) -> Path:
    """`path` as a Path, after making sure a file can be written there: its folder exists (or, with make_folder, can
    be made) and is writable, and it is neither a folder nor one of the files in `keep` (inputs that writing would
    destroy, e.g. the checkpoint)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder: give a file name (e.g. {path / 'out.json'})")
    parent = path.parent
    if make_folder and not _existing(parent).is_dir():
        raise OutputError(f"{option} {path}: {_existing(parent)} is a file, so the folder {parent} cannot be made")
    if not make_folder and not parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {parent} does not exist; make it first (mkdir -p {parent}) "
                          "or give a path in an existing folder")
    for other in keep:
        if path.exists() and Path(other).exists() and os.path.samefile(path, other):
            raise OutputError(f"{option} {path} would overwrite the input {other}: pick another file name")
    _writable(_existing(parent), option, path)
    return path


def run_files(out_dir: Path) -> list:
    """What marks a folder as a run's: its log.jsonl, checkpoints (iter_*.pt, half-written ones too), tensorboard/."""
    return sorted(p.name for p in (out_dir.glob("iter_*.pt*") if out_dir.is_dir() else [])) + \
        [name for name in ("log.jsonl", "tensorboard") if (out_dir / name).exists()]


def check_new_run(out_dir: Path, resume) -> None:
    """ConfigError unless `out_dir` holds no run or --resume is given: a second run in one folder would append its
    log to the first's (curves that jump back to iteration 1) and mix their checkpoints (--resume auto would pick
    the other run's newest)."""
    found = run_files(out_dir)
    if found and resume is None:
        shown = ", ".join(found[:3]) + (f", ... ({len(found)} in all)" if len(found) > 3 else "")
        raise ConfigError(f"--out-dir {out_dir} already holds a run ({shown}): continue it with --resume auto, or "
                          "pick another --out-dir (or remove that folder)")


def inside(name: str) -> str:
    """A relative path from data (an image's file name), as a name that stays inside the folder it is joined to: no
    root, '..' or '.' parts (the data pre-flight refuses such names; this keeps pictures in place whatever
    the dataset)."""
    parts = [p for p in PurePosixPath(PurePath(name).as_posix()).parts if p not in ("..", ".", "/")]
    if not parts:
        raise ConfigError(f"image name {name!r} names no file")
    return PurePosixPath(*parts).as_posix()
