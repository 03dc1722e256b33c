"""Run checkpoints (train.py's): what one holds, atomic writes, the latest and pruning, resuming from one bit-exactly
(weights, optimiser, scaler, data position and every RNG state of every rank), and the arguments and class names a
checkpoint remembers for eval.py and demo.py, also when it travelled as an export (tools/export.py: X.safetensors
with X.json beside it, the same json in the file's header).

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), so it loads with weights_only=True:
    model, optimizer, scaler   state dicts (the unwrapped model: no DDP prefix)
    iter                       optimiser steps done
    data                       {"epoch", "seen"}: the batch stream's whole state (batches.train_batches)
    rng                        one rng_state() per rank
    args, class_names          train.py's options (vars(args)) and the training classes
Only finite checkpoints are written (save_run), so the latest is one to resume from; a write that fails (a full disk)
leaves the previous one as it was.
"""
import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import build_model
from ..checkpoint import is_safetensors, is_torchscript, load_checkpoint, load_file
from ..configs import CONFIGS, config_overrides
from ..errors import ConfigError, MissingFileError, OutputError, TrainingError
from .distributed import print0

EXPORT_FORMAT, EXPORT_VERSION = "denseclip-export", 1  # what tools/export.py writes; readers refuse newer versions
NON_FINITE_HINT = "Try a lower --lr, --clip-grad 1.0, --amp none (or bf16), or check the data with --check-data full"


def export_json(path) -> Path:
    """The description tools/export.py writes next to X.safetensors: X.json."""
    return Path(path).with_suffix(".json")


def safetensors_metadata(path) -> dict:
    """The "__metadata__" strings of a .safetensors header (8-byte little-endian length, then JSON), read without
    the safetensors package."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__") or {}


def exported_run(path) -> dict:
    """saved_run of an export: its json (beside it, else the copy in the header) as a train.py checkpoint holds
    it: {"args": {"model", "overrides", the data options}, "class_names"}; {} for a safetensors file that has
    neither (a state dict from elsewhere: --model says which config)."""
    side = export_json(path)
    text = side.read_text() if side.is_file() else safetensors_metadata(path).get("denseclip")
    if text is None:
        return {}
    info = json.loads(text)
    if info.get("format") != EXPORT_FORMAT or not isinstance(info.get("version"), int):
        raise ConfigError(f"{side} does not describe a denseclip export (no \"format\": \"{EXPORT_FORMAT}\"); move "
                          "it away, or pass --model for the .safetensors file")
    if info["version"] > EXPORT_VERSION:
        raise ConfigError(f"{path} is an export of format version {info['version']}; this code reads version "
                          f"{EXPORT_VERSION} and older: update denseclip")
    return {"args": {**info.get("data", {}), "model": info["model"], "overrides": info["overrides"]},
            "class_names": info["class_names"]}


def saved_run(path: str) -> dict:
    """The small part of one of our checkpoints (its "args" and "class_names"), read without the tensors; {} for
    other files (official .pth, CLIP .pt)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path}: no such file")
    if is_safetensors(path):
        return exported_run(path)
    if is_torchscript(path):
        return {}  # an OpenAI CLIP archive (or a look-alike): load_checkpoint reads it, or says why not
    try:  # mmap: only the small pickle is read here, not the tensors
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, KeyError):
        obj = load_file(path)  # a legacy-format file loads; a damaged or unsafe one raises, saying why
    return {k: obj[k] for k in ("args", "class_names") if k in obj} if isinstance(obj, dict) else {}


def saved_train_args(path: str) -> dict:
    """train.py's arguments stored in one of its checkpoints; {} for other files (official .pth, CLIP .pt)."""
    return saved_run(path).get("args", {})


def model_from_checkpoint(path: str, name: str = None, class_names=None, overrides=()):
    """(model in eval mode, its load report, {"model", "overrides"}) from any file load_checkpoint reads: the config
    name, overrides and class names come from the file when it records them (train.py checkpoints, exports), else
    from the arguments (class names: build_model's default); `overrides` ("FIELD=VALUE") go after the file's."""
    run = saved_run(path)
    saved = run.get("args", {})
    name = name or saved.get("model")
    if name not in CONFIGS:
        raise ConfigError(f"{path} does not record its config: name it (--model NAME; one of {', '.join(CONFIGS)})"
                          if name is None else f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    items = list(saved.get("overrides", [])) + list(overrides)
    model = build_model(name, class_names or run.get("class_names"), **config_overrides(items, type(CONFIGS[name]())))
    report = load_checkpoint(model, path)
    return model.eval(), report, {"model": name, "overrides": items, **{k: v for k, v in saved.items()
                                                                        if k not in ("model", "overrides")}}


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


def gather_rng_states(world: int) -> list:
    """rng_state() of every rank, on every rank (each rank's dropout stream, for an exact resume)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def seed_rng(states, rank: int, world: int, seed: int):
    """This rank's RNGs: restored from a checkpoint's states when as many ranks saved them, else seeded with
    seed + rank (the caller adds the iteration resumed at): dropout and drop path draw differently on each rank."""
    if states is not None and len(states) == world:
        set_rng_state(states[rank])
    else:
        torch.manual_seed(seed + rank)
        np.random.seed(seed + rank)
        random.seed(seed + rank)


def resume(path, model, optimizer, scaler, model_name: str, batch_size: int, world: int):
    """Load a train.py checkpoint into the unwrapped model, the optimiser and the scaler; returns (iterations done,
    epoch, samples seen, RNG states of every rank)."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "iter"} <= set(ckpt):
        raise ConfigError(f"--resume {path} is not a train.py checkpoint (no optimizer / iteration state); "
                          "to start from its weights use --pretrained")
    if ckpt.get("args", {}).get("model", model_name) != model_name:
        raise ConfigError(f"--resume {path} was trained with --model {ckpt['args']['model']}, this run is "
                          f"--model {model_name}: pass --model {ckpt['args']['model']} or another --out-dir")
    if not all_finite([ckpt["model"], ckpt["optimizer"]]):
        last, _ = last_good_checkpoint(Path(path).parent)
        raise TrainingError(f"--resume {path} holds non-finite weights (NaN or infinity): continue from an earlier "
                            f"checkpoint{f', e.g. --resume {last}' if last else ''}")
    load_checkpoint(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    start, epoch, seen = ckpt["iter"], ckpt["data"]["epoch"], ckpt["data"]["seen"]
    if seen % (batch_size * world):
        raise ConfigError(f"{path} stopped {seen} samples into an epoch: not a whole number of micro-batches "
                          f"of {batch_size} x {world}")
    print0(f"resumed from {path} at iteration {start} (epoch {epoch}, sample {seen})")
    return start, epoch, seen, ckpt["rng"]


def same_start_on_every_rank(checkpoint, start: int, epoch: int, seen: int, world: int):
    """ConfigError on every rank unless all ranks continue from the same point. Each node reads --out-dir on its own
    disk and only rank 0 writes there: with a folder the nodes do not share, --resume auto finds the checkpoint on
    rank 0's node and nothing on the others, which would start from scratch and train out of step with rank 0."""
    if world == 1:
        return
    every = [None] * world
    dist.all_gather_object(every, (start, epoch, seen, str(checkpoint) if checkpoint else None))
    if len({point[:3] for point in every}) > 1:
        seen_by = "; ".join(f"rank {r}: {path or 'no checkpoint'}" + (f" (iteration {it})" if path else "")
                            for r, (it, _, _, path) in enumerate(every))
        raise ConfigError(f"the ranks would continue from different points ({seen_by}): every node must see the "
                          "same checkpoints, so give --out-dir a folder the nodes share, or copy the newest "
                          "iter_*.pt into --out-dir on every node")


def non_finite_tensors(model, optimizer) -> list:
    """Names of the model's and the optimiser's floating-point tensors that hold a NaN or an infinity ([]: none).
    Weights (or Adam's moments) can overflow a step before the loss does, so what is saved is checked, not assumed."""
    param_name = {id(p): n for n, p in model.named_parameters()}
    named = list(model.state_dict().items())
    for p, state in optimizer.state.items():
        named += [(f"{param_name.get(id(p), '?')} (optimiser {k})", v) for k, v in state.items()]
    named = [(k, v) for k, v in named if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not named:
        return []
    device = named[0][1].device  # one transfer for all flags, not one per tensor (AdamW's step counts are on CPU)
    finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in named]).tolist()
    return [k for (k, _), ok in zip(named, finite) if not ok]


def save_run(out_dir: Path, step: int, model, optimizer, scaler, data: dict, args, class_names, world: int):
    """OUT_DIR/iter_{step:06d}.pt (the contents of the module docstring), then --keep's pruning. Every rank calls
    it (the RNG states are gathered); rank 0 writes. Refused, with a TrainingError on every rank, when a tensor to be
    saved is not finite: every iter_*.pt this writes is one to resume from."""
    rng = gather_rng_states(world)
    bad = non_finite_tensors(model, optimizer)
    if world > 1:  # the ranks hold the same weights; gathered anyway, so that all stop together or none
        every = [None] * world
        dist.all_gather_object(every, bad)
        bad = sorted(set().union(*every))
    path = out_dir / f"iter_{step:06d}.pt"
    if bad:
        last = latest_checkpoint(out_dir)
        kept = f"{last} is the last good checkpoint" if last else "no checkpoint was written yet"
        raise TrainingError(f"non-finite weights after iteration {step} ({len(bad)} tensor(s) with NaN or infinity: "
                            f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}) while the loss was still finite; "
                            f"{path.name} was not written: {kept}. {NON_FINITE_HINT}")
    if world == 1 or dist.get_rank() == 0:
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "iter": step, "data": data, "rng": rng, "args": vars(args),
                         "class_names": list(class_names)}, path)
        prune_checkpoints(out_dir, args.keep)


def size_text(n: int) -> str:
    return next(f"{n / 2 ** e:.1f} {u}" for e, u in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                if n >= 2 ** e or e == 0)


def save_checkpoint(obj: dict, path: Path):
    """Atomic: a crash mid-write leaves the previous checkpoint, never a truncated one that --resume picks up. A
    write that fails (a full disk) removes its .tmp and raises OutputError saying why; nothing else is touched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: a full disk raises OSError(ENOSPC), not torch's "unexpected pos"
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        last = latest_checkpoint(path.parent)
        kept = (f"{last} is untouched: --resume auto continues from it" if last else "no earlier checkpoint exists")
        why = (f"the disk is full ({size_text(written)} written, {size_text(shutil.disk_usage(path.parent).free)} "
               f"free in {path.parent}): free some space" if e.errno == errno.ENOSPC else f"{e.strerror or e}")
        raise OutputError(f"cannot write checkpoint {path}: {why}; {kept}") from None


def latest_checkpoint(out_dir: Path):
    paths = sorted(out_dir.glob("iter_*.pt"))  # a half-written iter_*.pt.tmp (killed mid-save) never matches
    return paths[-1] if paths else None


def all_finite(obj) -> bool:
    """Whether every floating-point tensor in dicts and lists of any depth (a checkpoint) is finite."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
        elif isinstance(item, torch.Tensor) and item.is_floating_point() and not torch.isfinite(item).all():
            return False
    return True


def finite_file(path: Path) -> bool:
    """Whether a checkpoint file loads (weights_only) and all of its floating-point tensors are finite."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, KeyError, OSError):
        return False
    return all_finite(obj)


def last_good_checkpoint(out_dir: Path):
    """(the newest iter_*.pt that loads and holds only finite tensors, or None; the newer ones that do not)."""
    bad = []
    for path in sorted(out_dir.glob("iter_*.pt"), reverse=True):
        if finite_file(path):
            return path, bad
        bad.append(path)
    return None, bad


def prune_checkpoints(out_dir: Path, keep: int):
    """--keep N: delete all but the N latest iter_*.pt (0: keep all)."""
    if keep > 0:
        for path in sorted(out_dir.glob("iter_*.pt"))[:-keep]:
            path.unlink()
