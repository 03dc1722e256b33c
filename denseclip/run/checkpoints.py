"""Run checkpoints (train.py's): every RNG state as plain data, atomic writes, the latest and pruning, and the
arguments a checkpoint remembers."""
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import is_torchscript, load_file
from ..errors import MissingFileError


def saved_train_args(path: str) -> dict:
    """train.py's arguments stored in one of its checkpoints; {} for other files (official .pth, CLIP .pt)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path}: no such file")
    try:  # mmap: only the small pickle is read here, not the tensors
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, KeyError):
        if is_torchscript(path):
            return {}  # an OpenAI CLIP archive: load_checkpoint reads it
        obj = load_file(path)  # a legacy-format file loads; a damaged or unsafe one raises, saying why
    return obj.get("args", {}) if isinstance(obj, dict) else {}



# ------------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict:
    """Every RNG this process draws from, as plain data (weights_only loading accepts nothing else)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}



def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))



def save_checkpoint(obj: dict, path: Path):
    """Atomic: a crash mid-write leaves the previous checkpoint, never a truncated one that --resume picks up."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)



def latest_checkpoint(out_dir: Path):
    paths = sorted(out_dir.glob("iter_*.pt"))  # a half-written iter_*.pt.tmp (killed mid-save) never matches
    return paths[-1] if paths else None



def prune_checkpoints(out_dir: Path, keep: int):
    """--keep N: delete all but the N latest iter_*.pt (0: keep all)."""
    if keep > 0:
        for path in sorted(out_dir.glob("iter_*.pt"))[:-keep]:
            path.unlink()
