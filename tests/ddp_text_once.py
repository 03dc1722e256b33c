"""Run by tests/test_speed.py under torchrun (2 CPU processes, gloo): the gradients of one optimiser step of 2
micro-batches per rank, text encoder once per step (text parameters outside DDP, averaged by text_once_per_step)
against DDP's own per-micro-batch text path, and the shared prompt prefix against the text encoder's plain path
(both text once per step). Writes the relative differences and rank 0/1 contexts gradients."""
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's denseclip, not an installed one

from denseclip.data.procedural import SHAPE_CLASSES  # noqa: E402
from denseclip import build_model, language  # noqa: E402
from denseclip.run.distributed import wrap_ddp  # noqa: E402


def step_grads(text_once: bool, rank: int, share_prefix: bool = True):
    torch.manual_seed(0)  # the same weights on both ranks and in both modes
    model = build_model("denseclip_tiny", SHAPE_CLASSES, head_dropout=0.0, decoder_dropout=0.0).train()
    model.text_encoder.share_prefix = share_prefix
    # text once: the text parameters outside DDP's reducer, as train.py does it (run/distributed.wrap_ddp)
    ddp = wrap_ddp(model, torch.device("cpu")) if text_once else DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    with language.text_once_per_step(model, all_reduce=True) if text_once else contextlib.nullcontext():
        for micro in range(2):
            images = torch.randn(1, 3, 64, 64, generator=gen)
            labels = torch.randint(0, len(SHAPE_CLASSES), (1, 64, 64), generator=gen)
            with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
                (sum(ddp(images, labels).values()) / 2).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ref, once, plain = step_grads(False, rank), step_grads(True, rank), step_grads(True, rank, share_prefix=False)
    rel = {n: ((once[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref.items()}
    rel_plain = {n: ((once[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in plain.items()}
    contexts = [torch.zeros_like(once["contexts"]) for _ in range(2)]
    dist.all_gather(contexts, once["contexts"])
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"rel": rel, "rel_plain": rel_plain, "missing": sorted(set(ref) ^ set(once)),
                       "contexts_rank_diff": (contexts[0] - contexts[1]).abs().max().item(),
                       "contexts_norm": contexts[0].norm().item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
