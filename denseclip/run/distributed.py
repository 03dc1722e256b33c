"""Distributed set-up the plain way (torchrun's RANK / WORLD_SIZE / LOCAL_RANK), rank-0 printing, synchronised
BatchNorm on CPU, the DDP wrapper of the training step and the CPU thread count; shared by train.py and eval.py.

NCCL on GPUs, gloo on CPU, so two CPU processes run in CI. SyncBN only when world size > 1 (the official code
forced it and crashed on one GPU, issue #24). PyTorch's nn.SyncBatchNorm refuses CPU tensors, hence
CPUSyncBatchNorm below, with the same parameters and buffers so checkpoints do not depend on the device.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from ..language import text_once_parameters
from ..precision import at_least_fp32


THREADS_HELP = ("intra-op CPU threads per process (torch.set_num_threads); 0: torch's own default (one per core, "
                "or OMP_NUM_THREADS); unset: the recipe's, but OMP_NUM_THREADS when you set it")


def default_threads(recipe_value: int) -> int:
    """--threads left unset: the recipe's value, unless OMP_NUM_THREADS is set (then 0: torch follows it)."""
    return 0 if os.environ.get("OMP_NUM_THREADS") else recipe_value


@contextlib.contextmanager
def cpu_threads(threads: int):
    """torch's intra-op thread count set to `threads` for the block (0: left as it is), then restored (the
    entry points also run inside other programs: tests, notebooks).

    Why the procedural recipes default to 1 (bench/threads.py, 2-core machine, 60 steps of `python train.py`): on
    idle cores two threads are 1.16x faster than one (12.4 vs 14.4 s), but with two other busy processes on the
    cores they are 1.5-3x slower (31-61 s vs 21 s): the tiny model's thousands of small parallel regions each
    wait at a barrier for a thread that the other jobs have preempted. One thread also makes the run's floating-
    point sums, hence its numbers, the same on every machine whatever its core count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init_distributed(device: str = None):
    """(rank, world_size, device) from the variables torchrun sets; NCCL on GPUs, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                          "use --device cpu, or leave --device unset to take a GPU when there is one")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DistributedDataParallel around `model`, with the text-once parameters (the learnable contexts; the text
    encoder's too when it is not frozen) left out of its reducer.

    The text encoder runs once per optimiser step, not once per micro-batch (language.text_once_per_step): its
    backward happens when that context exits, after the micro-batches' backward passes and outside DDP, so DDP's
    hooks would wait for these gradients in vain; text_once_per_step(all_reduce=True) averages them over the ranks
    itself. No public API leaves parameters out of the reducer alone: the constructor's delay_all_reduce_named_params
    does, but then all-reduces them itself from a hook on some parameter's gradient, during the micro-batches' backward,
    before text_once_per_step has backpropagated into them (too early, and a second time); and turning their
    requires_grad off while DDP is constructed relies on when DDP reads the flag. So this is the private
    `_set_params_and_buffers_to_ignore_for_model`, which PyTorch marks a workaround until that API is settled
    (pytorch/pytorch#43690)."""
    text = {id(p) for p in text_once_parameters(model)}
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, p in model.named_parameters() if id(p) in text])
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (torchvision's model_without_ddp): what is evaluated and saved."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def print0(*args, **kwargs):
    """print on rank 0 only: the other ranks run the same code and would repeat every line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def reduce_mean(values: dict, world: int) -> dict:
    """Average tensors over ranks for logging (one all_reduce)."""
    stacked = torch.stack(list(values.values()))
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(values, stacked.tolist()))


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum): y = sum_r x_r on every rank, so dL/dx_r = sum_r' dL/dy_r' -- the
    backward is the same all-reduce of the incoming gradients. (torch.distributed.nn.functional.all_reduce does
    this too, but is deprecated in favour of a private module.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm for CPU processes (gloo), which PyTorch's does not support: training statistics over the
    global batch from all-reduced per-channel sums (two passes: mean, then squared deviations), differentiable
    through all_reduce_sum. Same parameters and buffers as BatchNorm, so checkpoints match."""

    def _check_input_dim(self, input):
        pass

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        x = at_least_fp32(input)  # statistics in at least fp32, also under autocast
        dims = [d for d in range(x.dim()) if d != 1]  # all but channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce_sum(torch.tensor(float(x.numel() // x.shape[1])))
        mean = all_reduce_sum(x.sum(dims)) / count
        var = all_reduce_sum(((x - mean.view(shape)) ** 2).sum(dims)) / count  # biased, for normalising
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean, m)
            self.running_var.lerp_(var * count / (count - 1), m)  # unbiased, as BatchNorm stores it
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (CUDA) or CPUSyncBatchNorm; called only when world size > 1."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
