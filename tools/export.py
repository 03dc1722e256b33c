"""Weights that travel: a trained model as a safetensors file with its description, and the segmentor as ONNX.

    python tools/export.py runs/demo/iter_003000.pt                  # -> runs/demo/iter_003000.{safetensors,json,onnx}
    python tools/export.py denseclip_fpn_res50.pth --model denseclip_r50 --out exports/r50 --text-free

Writes, named after --out (default: the checkpoint without its suffix):
  OUT.safetensors  the model's state dict in the safetensors format: tensors only, read without pickle
                   (denseclip.load_checkpoint, eval.py, demo.py and hubconf.py read it); --text-free drops the text
                   encoder first (language.drop_text_encoder: its features for the training classes stay)
  OUT.json         what the tensors are: the config name, the config overrides, the class names, the data options
                   eval.py and demo.py take from a train.py checkpoint, and the format version (also stored in the
                   safetensors header, so the file alone is enough)
  OUT.onnx         segmentors: the text-free model, image in, logits out, height and width free; checked against
                   PyTorch with onnxruntime on two sizes (the check is printed; above 1e-4 the export fails)
The ONNX graph is model(images) in eval mode, one whole image: input "images" (B, 3, H, W) float32 normalised with
CLIP's mean and std (in the file's metadata), output "logits" (B, K, H, W); slide inference and the softmax stay
outside. Detectors are exported as safetensors only. Formats need the `export` extra (safetensors, onnx,
onnxruntime, onnxscript); docs/export.md says what each file holds and its limits.
"""
import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from denseclip.clip import CLIP_MEAN, CLIP_STD
from denseclip.configs import CONFIGS, task_of
from denseclip.data.segmentation import read_class_names
from denseclip.errors import ConfigError, require_package, run_main, whole
from denseclip.language import drop_text_encoder
from denseclip.run.checkpoints import EXPORT_FORMAT, EXPORT_VERSION, export_json, model_from_checkpoint
from denseclip.run.outputs import check_out_dir

# The data options eval.py and demo.py take from a train.py checkpoint (eval.py's INHERIT less the model's own).
DATA_KEYS = ("dataset", "data_root", "img_dir", "ann_dir", "val_split", "img_suffix", "seg_suffix",
             "reduce_zero_label", "scale", "crop_size", "val_size", "train_ann", "train_images", "val_ann",
             "val_images")
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on the logits: float32 kernels that differ in summation order only
TRACE_SIZE = (96, 160)  # traced at a non-square size: no stored (square) positional grid is met, so none is skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint, or any file load_checkpoint reads (with --model)")
    p.add_argument("--out", help="output path without suffix (default: the checkpoint's, without its suffix)")
    p.add_argument("--model", choices=sorted(CONFIGS), metavar="NAME",
                   help="config name, one of denseclip.CONFIGS (default: the checkpoint's)")
    p.add_argument("--class-names", help="the model's classes: a file (one per line) or 'a,b,c' (default: the "
                                         "checkpoint's, else ADE20K's / COCO's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable; recorded in the json)")
    p.add_argument("--formats", nargs="+", choices=["safetensors", "onnx"],
                   help="default: both for a segmentor, safetensors for a detector")
    p.add_argument("--text-free", action="store_true", help="safetensors without the text encoder (no open "
                                                            "vocabulary, RN50: 63M parameters fewer)")
    p.add_argument("--check-sizes", type=whole(MIN_SIDE), nargs=4, metavar=("H1", "W1", "H2", "W2"),
                   help="the two input sizes of the ONNX check (default: the test crop squared, and a smaller size "
                        "that is no multiple of 32)")
    p.add_argument("--opset", type=whole(7), default=18, help="ONNX opset version (default 18)")
    return p.parse_args(argv)


def description(model, saved: dict, text_free: bool, source: str) -> dict:
    """The json of an export (run/checkpoints.py exported_run reads it back)."""
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": saved["model"],
            "overrides": saved["overrides"], "class_names": list(model.class_names), "task": model.task,
            "text_free": text_free, "data": {k: saved[k] for k in DATA_KEYS if k in saved},
            "source": Path(source).name, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}


def write_safetensors(model, path: Path, info: dict):
    """The state dict as safetensors (atomic: a temp file, then os.replace), the description in its header, and
    the same description as PATH.json."""
    require_package("safetensors", "the safetensors export", "export")
    from safetensors.torch import save

    text = json.dumps(info, indent=1)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save(tensors, metadata={"format": EXPORT_FORMAT, "model": info["model"], "denseclip": text}))
    os.replace(tmp, path)
    export_json(path).write_text(text + "\n")
    return len(tensors)


MIN_SIDE = 64  # the smallest input side of the graph: 2 cells at stride 32, the coarsest level (1 would broadcast)


def size_step(model) -> int:
    """What the ONNX input's height and width must be multiples of: 1 for the ResNets (any size), the patch size for
    a ViT (PyTorch pads to it; a graph that pads every size does not trace, so the caller pads, see pad_to_patches)."""
    return model.cfg.patch_size if model.cfg.backbone == "vit" else 1


def export_onnx(model, path: Path, info: dict, opset: int):
    """torch.export of the text-free model's forward, batch, height and width dynamic, then torch.onnx; the class
    names, mean, std and the input sizes it takes as the model's metadata. torch.export is called here rather than
    inside torch.onnx.export, whose fallbacks would accept a graph that holds for the traced size only: this one
    must hold for every size."""
    require_package("onnxscript", "the ONNX export (torch.onnx's exporter)", "export")
    step = size_step(model)
    H, W = (torch.export.Dim(d, min=-(-MIN_SIDE // step)) for d in "hw")
    H, W = (H, W) if step == 1 else (step * H, step * W)
    example = torch.randn(2, 3, *TRACE_SIZE)  # batch 2: torch.export would specialise a batch of 1
    exported = torch.export.export(model, (example,), dynamic_shapes={"images": {0: torch.export.Dim("B"), 2: H,
                                                                                  3: W}})
    program = torch.onnx.export(exported, input_names=["images"], output_names=["logits"], opset_version=opset,
                                dynamo=True, verbose=False)
    program.model.metadata_props.update({
        "denseclip": json.dumps({**info, "text_free": True}), "class_names": json.dumps(info["class_names"]),
        "mean": json.dumps(info["mean"]), "std": json.dumps(info["std"]),
        "input": f"images (B, 3, H, W) float32, RGB normalised with mean / std; H, W >= {MIN_SIDE}" +
                 (f", multiples of {step}" if step > 1 else ""), "output": "logits (B, K, H, W)"})
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp), external_data=False)  # one file: every config is far below ONNX's 2 GB limit
    os.replace(tmp, path)


@torch.no_grad()
def check_onnx(model, path: Path, sizes, seed: int = 0) -> list:
    """[(H, W, max |onnxruntime - PyTorch|, max |PyTorch logit|)] on a random normalised image of each size."""
    ort = require_package("onnxruntime", "the ONNX check", "export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, out = torch.Generator().manual_seed(seed), []
    for H, W in sizes:
        x = torch.randn(1, 3, H, W, generator=generator)  # (1, 3, H, W)
        ref = model(x).numpy()  # (1, K, H, W)
        got = session.run(["logits"], {"images": x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: onnxruntime gave logits of shape {got.shape} for a {H}x{W} input, "
                               f"PyTorch {ref.shape}")
        out.append((H, W, float(np.abs(got - ref).max()), float(np.abs(ref).max())))
    return out


def check_sizes(model, given) -> list:
    crop, step = model.cfg.test_crop, size_step(model)
    if given:
        if min(given) < MIN_SIDE or any(n % step for n in given):
            raise ConfigError(f"--check-sizes {' '.join(map(str, given))}: the graph takes sides of at least "
                              f"{MIN_SIDE}" + (f", multiples of {step}" if step > 1 else ""))
        return [tuple(given[:2]), tuple(given[2:])]
    return [(crop, crop), tuple(max(MIN_SIDE, -(-n // step) * step) for n in (crop // 2 + 8, crop + 24))]


def class_names(value):
    if value is None:
        return None
    return read_class_names(value if Path(value).is_file() else value.split(","))


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix("")
    check_out_dir(out.parent, "--out")  # before the model is loaded: its folder is made if missing
    model, report, saved = model_from_checkpoint(args.checkpoint, args.model, class_names(args.class_names),
                                                 args.overrides)
    if report.kind != "model":
        raise ConfigError(f"{args.checkpoint} holds {report.kind} weights, not a trained model: nothing to export")
    task = task_of(saved["model"])
    formats = args.formats or (["safetensors", "onnx"] if task == "segmentation" else ["safetensors"])
    if "onnx" in formats and task != "segmentation":
        raise ConfigError(f"{saved['model']} is a {task} model: the ONNX export is for segmentors (use --formats "
                          "safetensors)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if "safetensors" in formats:
        exported = drop_text_encoder(copy.deepcopy(model)) if args.text_free else model
        info = description(exported, saved, args.text_free, args.checkpoint)
        n = write_safetensors(exported, out.with_suffix(".safetensors"), info)
        print(f"wrote {out.with_suffix('.safetensors')} ({n} tensors{', text-free' if args.text_free else ''}) and "
              f"{export_json(out.with_suffix('.safetensors'))} ({saved['model']}, {model.num_classes} classes)")
    if "onnx" in formats:
        free = drop_text_encoder(copy.deepcopy(model)).eval()
        export_onnx(free, out.with_suffix(".onnx"), description(free, saved, True, args.checkpoint), args.opset)
        checks = check_onnx(free, out.with_suffix(".onnx"), check_sizes(model, args.check_sizes))
        print(f"wrote {out.with_suffix('.onnx')}; onnxruntime vs PyTorch, max |difference| of the logits: " +
              ", ".join(f"{H}x{W}: {err:.2e} (logits up to {top:.3g})" for H, W, err, top in checks) +
              f" (tolerance {TOLERANCE:g})")
        if max(err for _, _, err, _ in checks) > TOLERANCE:
            raise RuntimeError(f"{out.with_suffix('.onnx')} differs from the PyTorch model by more than "
                               f"{TOLERANCE:g}: do not use it (a bug: report the config and the sizes)")
    return out


if __name__ == "__main__":
    run_main(main)
