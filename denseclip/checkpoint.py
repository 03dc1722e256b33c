"""Loading weights into a DenseCLIP segmentor or detector, with every key accounted for.

`load_checkpoint(model, path)` recognises, from the keys alone:
- a whole-model checkpoint: ours (train.py's `{"model": ...}` or a bare state dict) or an official
  DenseCLIP / mmseg one (`{"state_dict": ...}`, keys backbone.*, text_encoder.*, context_decoder.*,
  neck.lateral_convs.0.conv.*, decode_head.scale_heads.*, contexts, gamma). Our module names are
  the official ones, so no renaming happens; the load is strict and any missing, unexpected or
  wrongly shaped key is an error naming it (the official code prints and carries on);
- an official DenseCLIP / mmdet RetinaNet checkpoint: the same, except that mmdet's RetinaHead
  (`bbox_head.*`) is renamed onto torchvision's RetinaNetHead (`head.*`) by `mmdet_retina_head_to_ours`;
- an OpenAI CLIP file (TorchScript archive or state dict): initialises the image encoder (positional
  embeddings resized to the model's grid, as the official init_weights does) and the text encoder
  (positional embedding truncated to the text length). New layers may be missing; CLIP keys the
  model has no place for (e.g. the attention pool for a plain-FPN baseline) are reported as unused;
- a torchvision ImageNet ResNet state dict: initialises the any-backbone variant's ResNet.
Files are read with `torch.load(weights_only=True)`, or as TorchScript archives, which run no pickle code.
"""
import re
import zipfile
from dataclasses import dataclass, field
from typing import List, Union

import torch
from torch import nn

from .clip import read_openai_state_dict, resize_pos_embed


class CheckpointError(RuntimeError):
    pass


@dataclass
class LoadReport:
    kind: str  # "model", "clip" or "imagenet"
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # model keys left at their initialisation
    unused: List[str] = field(default_factory=list)  # file keys with no place in the model

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} tensors ({self.kind})"]
        if self.missing:
            lines.append(f"newly initialised ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unused:
            lines.append(f"unused from the file ({len(self.unused)}): {', '.join(self.unused)}")
        return "\n".join(lines)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def read_state_dict(path: str) -> dict:
    """The tensors of a checkpoint file, unwrapped from {"model"|"state_dict": ...} and DDP's "module."."""
    if _is_torchscript(path):
        return read_openai_state_dict(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_shapes(model_sd: dict, sd: dict):
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
           for k, v in sd.items() if k in model_sd and v.shape != model_sd[k].shape]
    if bad:
        raise CheckpointError("shape mismatch:\n  " + "\n  ".join(bad))


def _load_whole(model: nn.Module, sd: dict) -> LoadReport:
    model_sd = model.state_dict()
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    _check_shapes(model_sd, sd)
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


def clip_to_segmentor(sd: dict, model: nn.Module):
    """OpenAI CLIP keys -> segmentor keys: visual.* -> backbone.* (CLIP backbones only), the text tower
    -> text_encoder.*; positional embeddings adapted to the model's shapes. Other keys keep their name
    (and end up reported as unused). Returns (state dict, {our key: file key})."""
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


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, dict]) -> LoadReport:
    """Load weights into `model` (a segmentor or detector); see the module docstring. Returns a report."""
    sd = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_state_dict(path_or_state_dict)
    if "token_embedding.weight" in sd or "visual.conv1.weight" in sd:
        new = ("backbone.fpn",) if model.cfg.backbone == "vit" else ()
        sd, file_names = clip_to_segmentor(sd, model)
        return _load_partial(model, sd, "clip", lambda k: not k.startswith(("backbone.", "text_encoder.")) or
                             k.startswith(new), file_names)
    if "fc.weight" in sd and "layer1.0.conv1.weight" in sd:
        if model.cfg.backbone != "torchvision_resnet50":
            raise CheckpointError("an ImageNet ResNet state dict only initialises the denseclip_imagenet_r50 backbone")
        file_names = {"backbone." + k: k for k in sd}
        sd = {"backbone." + k: v for k, v in sd.items()}
        return _load_partial(model, sd, "imagenet", lambda k: not k.startswith("backbone.") or ".attnpool." in k,
                             file_names)
    if any(k.startswith("bbox_head.") for k in sd):  # official mmdet RetinaNet
        sd = mmdet_retina_head_to_ours(sd)
    if "text_embeddings" in sd and hasattr(model, "text_encoder"):  # saved after drop_text_encoder()
        model.drop_text_encoder()
    return _load_whole(model, sd)
