"""Activation checkpointing of the image encoder (train.py --checkpoint-activations): keep only each residual
block's input during the forward and recompute the block in the backward, trading about one extra forward of the
image encoder for most of its activation memory (torch.utils.checkpoint, non-reentrant).

Not in the official code. Parameter names and the state dict are unchanged: the blocks' own `forward` is wrapped
in place. BatchNorm running statistics are updated once, not twice: the recomputation runs with momentum 0 (and
restores num_batches_tracked). Dropout and drop path draw the same masks again (checkpoint replays the RNG state).
"""
import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..clip import ResidualAttentionBlock, TextEncoder
from ..resnet import Bottleneck

BLOCKS = (Bottleneck, ResidualAttentionBlock, torchvision.models.resnet.Bottleneck)


def _checkpointed(block: nn.Module):
    forward = block.forward

    def run(*args):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args)
        calls = []

        def fn(*inputs):
            calls.append(1)
            if len(calls) == 1:  # the real forward
                return forward(*inputs)
            # looked up now: convert_sync_batchnorm may have replaced the norms after wrapping
            norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            try:
                return forward(*inputs)
            finally:
                for m, momentum, tracked in saved:
                    m.momentum = momentum
                    m.num_batches_tracked.copy_(tracked)

        return checkpoint(fn, *args, use_reentrant=False)

    block.forward = run


def checkpoint_activations(model: nn.Module) -> int:
    """Checkpoint every residual block of `model` outside text encoders (frozen, run once per step); returns how
    many blocks were wrapped."""
    skip = {id(m) for t in model.modules() if isinstance(t, TextEncoder) for m in t.modules()}
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS) and id(m) not in skip]
    for block in blocks:
        _checkpointed(block)
    return len(blocks)
