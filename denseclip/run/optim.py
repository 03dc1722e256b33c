"""The official optimiser set-up (mmcv), written out: per-parameter lr / weight-decay multipliers chosen by
substring keys (`paramwise_cfg.custom_keys`), the poly learning-rate schedule with linear warmup (segmentation)
and the step schedule with linear warmup (detection)."""
from torch import nn

WARMUP_RATIO = 1e-6  # mmcv's warmup_ratio in the official configs: warmup starts at base_lr * 1e-6
POLY_POWER = 0.9
STEP_WARMUP_RATIO = 1e-3  # the official detection configs: warmup starts at base_lr * 0.001
STEP_GAMMA = 0.1  # lr x0.1 at each step (mmdet's 1x schedule: epochs 8 and 11)

CUSTOM_KEYS = {"backbone": {"lr_mult": 0.1}, "text_encoder": {"lr_mult": 0.0}, "norm": {"decay_mult": 0.0}}


def param_rule(name: str, custom_keys: dict) -> dict:
    """mmcv's `paramwise_cfg.custom_keys`, as the official configs use it. The keys are sorted by length (longest
    first), ties alphabetically; the FIRST key that is a substring of the parameter name applies, and only that
    one. So every backbone parameter (its BatchNorms too) gets lr x0.1 with full weight decay, and a parameter
    outside the backbone with 'norm' in its name (the context decoder's LayerNorms; the head's BatchNorms are
    called 'bn') gets no weight decay. Returns {'key', 'lr_mult', 'decay_mult'}; key None when none matches."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return {"key": key, "lr_mult": custom_keys[key].get("lr_mult", 1.0),
                    "decay_mult": custom_keys[key].get("decay_mult", 1.0)}
    return {"key": None, "lr_mult": 1.0, "decay_mult": 1.0}


def custom_keys_for(backbone_lr_mult: float, train_text_encoder: bool = False) -> dict:
    """CUSTOM_KEYS with the run's backbone lr multiplier (--backbone-lr-mult). An unfrozen text encoder
    (freeze_text_encoder=False) learns at the same multiplier, a pretrained encoder like the image one: with the
    official lr x0 it would stay frozen while its parameters asked for gradients."""
    keys = dict(CUSTOM_KEYS, backbone={"lr_mult": backbone_lr_mult})
    if train_text_encoder:
        keys["text_encoder"] = {"lr_mult": backbone_lr_mult}
    return keys


def param_groups(model: nn.Module, lr: float, weight_decay: float, custom_keys: dict) -> list:
    """One optimiser group per matched key. Frozen parameters and lr_mult 0 get none: with mmcv they sat in the
    optimiser at lr 0, which the poly floor makes (base 0 - min_lr) * coeff + min_lr > 0 after the first step
    -- a likely cause of the text-encoder drift reported in issue #28."""
    groups = {}
    for name, p in model.named_parameters():
        rule = param_rule(name, custom_keys)
        if not p.requires_grad or rule["lr_mult"] == 0:
            continue
        group = groups.setdefault(rule["key"], {"params": [], "name": rule["key"] or "default",
                                                "initial_lr": lr * rule["lr_mult"],
                                                "weight_decay": weight_decay * rule["decay_mult"]})
        group["params"].append(p)
    return list(groups.values())


def lr_at(it: int, base_lr: float, max_iters: int, warmup_iters: int, min_lr: float) -> float:
    """mmcv's PolyLrUpdaterHook (power 0.9, absolute min_lr) with linear warmup from base x WARMUP_RATIO,
    evaluated at the 0-based iteration `it` before its optimiser step."""
    lr = (base_lr - min_lr) * (1 - it / max_iters) ** POLY_POWER + min_lr
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - WARMUP_RATIO)
    return lr


def step_lr_at(it: int, base_lr: float, steps, warmup_iters: int, warmup_ratio: float = STEP_WARMUP_RATIO) -> float:
    """mmcv's StepLrUpdaterHook (lr x0.1 for each step in `steps` that `it` has reached) with linear warmup from
    base x warmup_ratio, at the 0-based iteration `it`. mmdet steps by epoch; here `steps` are the first
    iterations of those epochs (epoch x iterations per epoch), which gives the same lr at every iteration."""
    lr = base_lr * STEP_GAMMA ** sum(it >= s for s in steps)
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr
