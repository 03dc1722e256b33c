"""Loading weights, with every key accounted for: OpenAI CLIP files (`load_clip`) and any checkpoint into a DenseCLIP
segmentor or detector (`load_checkpoint`).

`load_clip(path)` reads an OpenAI CLIP `.pt` archive (or a state dict with OpenAI's key names) and builds the CLIP
model its weights describe (the architecture is read off the weight shapes, as OpenAI's build_model does).
`load_checkpoint(model, path)` recognises, from the keys alone:
- a whole-model checkpoint: ours (train.py's `{"model": ...}` or a bare state dict) or an official
  DenseCLIP / mmseg one (`{"state_dict": ...}`, keys backbone.*, text_encoder.*, context_decoder.*,
  neck.lateral_convs.0.conv.*, decode_head.scale_heads.*, contexts, gamma). Our module names are
  the official ones, so no renaming happens; the load is strict and any missing, unexpected or
  wrongly shaped key is an error naming it (the official code prints and carries on);
- an official DenseCLIP / mmdet RetinaNet checkpoint: the same, except that mmdet's RetinaHead
  (`bbox_head.*`) is renamed onto torchvision's RetinaNetHead (`head.*`) by `mmdet_retina_head_to_ours`;
- an official DenseCLIP / mmdet Mask R-CNN checkpoint: the same, with mmdet's RPNHead, Shared2FCBBoxHead and
  FCNMaskHead (`rpn_head.*`, `roi_head.*`) mapped onto torchvision's RPN and RoI heads by
  `mmdet_maskrcnn_heads_to_ours`; the rows torchvision has for its background class 0 and mmdet has not are
  filled with zeros and listed in the report's notes;
- an export without text encoder (language.drop_text_encoder: buffers text_embeddings, text_class_names): the
  model's own text encoder is dropped before the strict load, once the export's class names are found to be the
  model's (its text features cannot answer for others);
- an OpenAI CLIP file (TorchScript archive or state dict): initialises the image encoder (positional
  embeddings resized to the model's grid, as the official init_weights does) and the text encoder
  (positional embedding truncated to the text length). New layers may be missing; CLIP keys the
  model has no place for (e.g. the attention pool for a plain-FPN baseline) are reported as unused;
- a torchvision ImageNet ResNet state dict: initialises the any-backbone variant's ResNet.
Files are read with `torch.load(weights_only=True)`, as TorchScript archives, which run no pickle code, or, for a
`.safetensors` file (tools/export.py writes them; any file in that format is recognised by its header), by
safetensors' own loader: no pickle at all (the optional package safetensors, the `export` extra).
A file that cannot be read says why: missing, empty, truncated, not a PyTorch file at all, or refused by the safe
loader (with how to convert a file one trusts); a checkpoint of another architecture names the config it was
trained with when the file records it.
"""
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import List, Union

import torch
from torch import nn

from .clip import CLIP, TextEncoder, VisionTransformer, resize_pos_embed
from .errors import MissingFileError, UserError, require_package
from .language import decode_names, drop_text_encoder
from .resnet import ModifiedResNet


class CheckpointError(UserError, RuntimeError):
    pass


@dataclass
class LoadReport:
    kind: str  # "model", "clip" or "imagenet"
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # model keys left at their initialisation
    unused: List[str] = field(default_factory=list)  # file keys with no place in the model
    notes: List[str] = field(default_factory=list)  # "model key: what was filled in and why" (mapped files)

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} tensors ({self.kind})"]
        if self.missing:
            lines.append(f"newly initialised ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unused:
            lines.append(f"unused from the file ({len(self.unused)}): {', '.join(self.unused)}")
        lines += self.notes
        return "\n".join(lines)


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def load_file(path: str):
    """torch.load(weights_only=True) with an error that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the copy or the save that wrote it failed")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or damaged (an incomplete zip archive, "
                              f"{os.path.getsize(path)} bytes): copy or download it again")
    if is_torchscript(path):  # torch.load would suggest weights_only=False: unsafe, and not what is needed here
        raise CheckpointError(f"{path} is a TorchScript archive (an OpenAI CLIP file, or a look-alike), not a "
                              "torch.save checkpoint: it holds no training state (OpenAI CLIP weights: --pretrained)")
    if not head.startswith((b"PK", b"\x80")):  # neither a zip archive nor a pickle (legacy torch.save)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with bytes {head!r}); "
                              "expected a .pt/.pth file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{path} was refused by the safe loader (torch.load weights_only=True): it holds Python objects "
            f"beyond tensors and plain data, and unpickling them could run code from the file. {why}\n"
            f"If you trust the file, convert it once to plain tensors:\n  python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); "
            f"torch.save({{'state_dict': c.get('state_dict', c.get('model', c))}}, '{path}.plain.pth')\"") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else 'unexpected end'}): copy or download it "
                              "again") from None


def is_safetensors(path: str) -> bool:
    """safetensors' layout: an 8-byte little-endian header length, then the header, a JSON object."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_safetensors(path: str):
    """(tensors, {"args": {"model": ...}} when the header's metadata names the config) of a .safetensors file."""
    safetensors = require_package("safetensors", f"reading {path} (a safetensors file)", "export")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged ({type(e).__name__}: {e}): copy or "
                              "export it again") from None
    return sd, {"args": {"model": meta["model"]}} if "model" in meta else {}


def read_checkpoint(path: str):
    """(tensors, the whole file object) of a checkpoint file; the tensors unwrapped from {"model"|"state_dict": ...}
    and DDP's "module."."""
    if is_safetensors(path):
        return read_safetensors(path)
    if is_torchscript(path):
        return read_openai_state_dict(path), {}
    obj = load_file(path)
    sd = obj
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict (expected tensors by name, or {{'model'|'state_dict': "
                              "...}}); is it a checkpoint of a model?")
    return {k.removeprefix("module."): v for k, v in sd.items()}, obj if isinstance(obj, dict) else {}


def _trained_with(meta: dict) -> str:
    """'; the file was trained with --model NAME' when it says (train.py checkpoints record their arguments)."""
    name = meta.get("args", {}).get("model") if isinstance(meta.get("args"), dict) else None
    return f"; the file was trained with --model {name}" if name else ""


def _few(keys, n=8) -> str:
    """The first n keys as a list, and how many more (another architecture differs in hundreds)."""
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


def _check_shapes(model_sd: dict, sd: dict, hint: str = ""):
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
           for k, v in sd.items() if k in model_sd and v.shape != model_sd[k].shape]
    if bad:
        raise CheckpointError("shape mismatch:\n  " + "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "") +
                              hint)


def _load_whole(model: nn.Module, sd: dict, meta: dict = None) -> LoadReport:
    model_sd, hint = model.state_dict(), _trained_with(meta or {})
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model (another architecture?): missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}{hint}")
    _check_shapes(model_sd, sd, hint)
    model.load_state_dict(sd, strict=True)
    return LoadReport("model", loaded=sorted(sd))


def _load_partial(model: nn.Module, sd: dict, kind: str, may_be_new, file_names=None) -> LoadReport:
    """Load the keys the model has; every model key the file lacks must satisfy may_be_new(key).
    Unused keys are reported under their names in the file (file_names: our key -> file key)."""
    model_sd = model.state_dict()
    used = {k: v for k, v in sd.items() if k in model_sd}
    _check_shapes(model_sd, used)
    missing = sorted(set(model_sd) - set(used))
    wrong = [k for k in missing if not may_be_new(k)]
    if wrong:
        raise CheckpointError(f"the {kind} file lacks weights the model needs: {wrong}")
    model.load_state_dict(used, strict=False)
    unused = sorted((file_names or {}).get(k, k) for k in set(sd) - set(used))
    return LoadReport(kind, loaded=sorted(used), missing=missing, unused=unused)


def clip_to_model(sd: dict, model: nn.Module):
    """OpenAI CLIP keys -> a segmentor's or detector's keys: visual.* -> backbone.* (CLIP backbones only), the text
    tower -> text_encoder.*; positional embeddings adapted to the model's shapes. Other keys keep their name (and end
    up reported as unused). Returns (state dict, {our key: file key})."""
    target = model.state_dict()
    clip_backbone = model.cfg.backbone in ("resnet", "vit")
    out, file_names = {}, {}
    for name, v in sd.items():
        k = name
        if k.startswith("visual."):
            k = "backbone." + k[len("visual."):] if clip_backbone else k
        elif k != "logit_scale" and hasattr(model, "text_encoder"):
            k = "text_encoder." + k
        if k in target and k.endswith("positional_embedding") and v.shape != target[k].shape:
            if k.startswith("text_encoder."):
                v = v[: target[k].shape[0]]  # causal text: the first positions are all it ever uses
            else:
                S = int((target[k].shape[0] - 1) ** 0.5)
                v = resize_pos_embed(v, (S, S))
        out[k], file_names[k] = v, name
    return out, file_names


def mmdet_retina_head_to_ours(sd: dict) -> dict:
    """mmdet's RetinaHead keys -> torchvision's RetinaNetHead keys; other keys pass unchanged. A `bbox_head.*` key
    that is not a RetinaHead parameter is an error. No tensor changes: both heads lay out their outputs as
    (anchor, class) -- channel a*K + k of retina_cls / cls_logits, a*4 + c of retina_reg / bbox_reg -- over
    anchors ordered (ratio, scale), and both box codings are (dx, dy, dw, dh) with unit weights / stds."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("bbox_head."):
            out[k] = v
            continue
        conv = re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)", k)
        final = re.fullmatch(r"bbox_head\.retina_(cls|reg)\.(weight|bias)", k)
        if conv:
            branch, i, p = conv.groups()
            out[f"head.{'classification' if branch == 'cls' else 'regression'}_head.conv.{i}.0.{p}"] = v
        elif final:
            branch, p = final.groups()
            out[f"head.classification_head.cls_logits.{p}" if branch == "cls" else
                f"head.regression_head.bbox_reg.{p}"] = v
        else:
            raise CheckpointError(f"unexpected RetinaHead key {k!r} (expected cls_convs.i.conv, reg_convs.i.conv, "
                                  f"retina_cls, retina_reg)")
    return out


MASKRCNN_HEAD_KEYS = {  # mmdet 2.17 Mask R-CNN head parameter (without .weight / .bias) -> torchvision's
    r"rpn_head\.rpn_conv": "rpn.head.conv.0.0", r"rpn_head\.rpn_cls": "rpn.head.cls_logits",
    r"rpn_head\.rpn_reg": "rpn.head.bbox_pred",
    r"roi_head\.bbox_head\.shared_fcs\.0": "roi_heads.box_head.fc6",
    r"roi_head\.bbox_head\.shared_fcs\.1": "roi_heads.box_head.fc7",
    r"roi_head\.bbox_head\.fc_cls": "roi_heads.box_predictor.cls_score",
    r"roi_head\.bbox_head\.fc_reg": "roi_heads.box_predictor.bbox_pred",
    r"roi_head\.mask_head\.convs\.(\d)\.conv": r"roi_heads.mask_head.\1.0",
    r"roi_head\.mask_head\.upsample": "roi_heads.mask_predictor.conv5_mask",
    r"roi_head\.mask_head\.conv_logits": "roi_heads.mask_predictor.mask_fcn_logits",
}


def mmdet_maskrcnn_heads_to_ours(sd: dict):
    """mmdet's Mask R-CNN heads -> torchvision's; other keys pass unchanged; an unknown `rpn_head.*` / `roi_head.*`
    key is an error. Returns (state dict, notes). The RPN and the fcs / convs map one to one (same layouts: anchor-
    major RPN channels over ratio-ordered anchors; (dx, dy, dw, dh) codings whose mmdet stds (1,1,1,1) and
    (0.1,0.1,0.2,0.2) are torchvision's weights (1,1,1,1) and (10,10,5,5)). The class axes differ: mmdet's fc_cls
    has background LAST (K + 1 rows), torchvision's cls_score FIRST, so the row moves; mmdet's fc_reg (4K) and
    conv_logits (K) have no background rows, torchvision's bbox_pred (4(K+1)) and mask_fcn_logits (K+1) do:
    zeros go there (torchvision never reads them: it drops class 0 from boxes and masks), and a note says so."""
    out, notes = {}, set()
    for k, v in sd.items():
        if not k.startswith(("rpn_head.", "roi_head.")):
            out[k] = v
            continue
        name, _, param = k.rpartition(".")
        target = next((re.sub(p, t, name) for p, t in MASKRCNN_HEAD_KEYS.items() if re.fullmatch(p, name)), None)
        if target is None or param not in ("weight", "bias"):
            raise CheckpointError(f"unexpected Mask R-CNN head key {k!r} (expected rpn_head.rpn_conv/rpn_cls/rpn_reg, "
                                  f"roi_head.bbox_head.shared_fcs.0-1/fc_cls/fc_reg, roi_head.mask_head.convs.i.conv/"
                                  f"upsample/conv_logits)")
        if name.endswith("fc_cls"):
            v = torch.cat([v[-1:], v[:-1]])  # background: last (mmdet) -> first (torchvision)
        elif name.endswith(("fc_reg", "conv_logits")):
            rows = 4 if name.endswith("fc_reg") else 1
            v = torch.cat([v.new_zeros(rows, *v.shape[1:]), v])
            notes.add(f"{target}: zeros for torchvision's background class 0 (mmdet's {name} has no background "
                      f"row; torchvision never uses it)")
        out[f"{target}.{param}"] = v
    return out, sorted(notes)


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, dict]) -> LoadReport:
    """Load weights into `model` (a segmentor or detector); see the module docstring. Returns a report."""
    if isinstance(path_or_state_dict, dict):
        sd, meta = path_or_state_dict, {}
    else:
        sd, meta = read_checkpoint(path_or_state_dict)
    if "token_embedding.weight" in sd or "visual.conv1.weight" in sd:
        new = ("backbone.fpn",) if model.cfg.backbone == "vit" else ()
        sd, file_names = clip_to_model(sd, model)
        return _load_partial(model, sd, "clip", lambda k: not k.startswith(("backbone.", "text_encoder.")) or
                             k.startswith(new), file_names)
    if "fc.weight" in sd and "layer1.0.conv1.weight" in sd:
        if model.cfg.backbone != "torchvision_resnet50":
            raise CheckpointError("an ImageNet ResNet state dict only initialises the denseclip_imagenet_r50 backbone")
        file_names = {"backbone." + k: k for k in sd}
        sd = {"backbone." + k: v for k, v in sd.items()}
        return _load_partial(model, sd, "imagenet", lambda k: not k.startswith("backbone.") or ".attnpool." in k,
                             file_names)
    notes = []
    if any(k.startswith("bbox_head.") for k in sd):  # official mmdet RetinaNet
        sd = mmdet_retina_head_to_ours(sd)
    if any(k.startswith(("rpn_head.", "roi_head.")) for k in sd):  # official mmdet Mask R-CNN
        sd, notes = mmdet_maskrcnn_heads_to_ours(sd)
    if "text_embeddings" in sd:  # saved after drop_text_encoder(): the text features hold its classes
        saved = decode_names(sd["text_class_names"]) if "text_class_names" in sd else None
        if saved is not None and saved != list(model.class_names):
            raise CheckpointError(f"this export without text encoder was made for the classes {saved[:10]}"
                                  f"{' ...' if len(saved) > 10 else ''} ({len(saved)}); the model was built with "
                                  f"{list(model.class_names)[:10]} ({model.num_classes}): its text features cannot "
                                  "change, so build the model with the export's class names")
        if hasattr(model, "text_encoder"):
            drop_text_encoder(model)
    report = _load_whole(model, sd, meta)
    report.notes = notes
    return report


# The JIT archives carry these as state; they are architecture facts read off the weights instead.
_ARCHIVE_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_openai_state_dict(path: str) -> dict:
    """State dict of an OpenAI CLIP file: a TorchScript archive (what OpenAI distributes; loading one
    runs no Python pickle code) or a plain state dict, read with weights_only=True. fp16 -> fp32."""
    if not is_torchscript(path):
        sd = load_file(path)  # a damaged or unsafe file raises, saying why
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; OpenAI's files use it
                sd = torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError:  # never retried as a pickle: that is how a look-alike would run its code
            raise CheckpointError(f"{path} looks like a TorchScript archive (it holds a constants.pkl) but "
                                  "torch.jit.load cannot read it, and it is not opened any other way: download the "
                                  "OpenAI CLIP file again, or give a state dict saved with torch.save") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in _ARCHIVE_ONLY_KEYS}


def openai_to_ours(sd: dict) -> dict:
    """OpenAI key names -> CLIP's: the text tower's top-level keys move under `text.`."""
    return {k if k.startswith("visual.") or k == "logit_scale" else "text." + k: v for k, v in sd.items()}


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def clip_architecture(sd: dict) -> dict:
    """Read the architecture off OpenAI-named weights (as OpenAI's build_model does)."""
    text = dict(context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                width=sd["ln_final.weight"].shape[0], heads=sd["ln_final.weight"].shape[0] // 64,
                layers=_count(sd, "transformer.resblocks."), embed_dim=sd["text_projection"].shape[1])
    if "visual.proj" in sd:
        width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        visual = dict(kind="vit", input_resolution=patch * grid, patch_size=patch, width=width,
                      layers=_count(sd, "visual.transformer.resblocks."), heads=width // 64,
                      output_dim=sd["visual.proj"].shape[1])
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
        visual = dict(kind="resnet", layers=[_count(sd, f"visual.layer{i}.") for i in range(1, 5)], width=width,
                      heads=width * 32 // 64, input_resolution=grid * 32,
                      output_dim=sd["visual.attnpool.c_proj.weight"].shape[0])
    return dict(visual=visual, text=text)


def build_visual(kind: str, **cfg) -> nn.Module:
    return VisionTransformer(**cfg) if kind == "vit" else ModifiedResNet(**cfg)


def load_clip(path_or_state_dict: Union[str, dict]) -> CLIP:
    """OpenAI CLIP from a `.pt` archive, a state dict file, or a state dict with OpenAI key names.
    The architecture is inferred from the weights; loading is strict. Returns an fp32 model in eval."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = read_openai_state_dict(sd)
    sd = {k: v for k, v in sd.items() if k not in _ARCHIVE_ONLY_KEYS}
    arch = clip_architecture(sd)
    model = CLIP(build_visual(**arch["visual"]), TextEncoder(**arch["text"]))
    model.load_state_dict(openai_to_ours(sd), strict=True)
    return model.float().eval()
