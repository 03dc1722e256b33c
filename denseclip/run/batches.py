"""The training batch stream: endless, distributed, resumable from (epoch, samples seen) alone; and moving a batch
to the device."""
import signal

import numpy as np
import torch


def ignore_stop_signals(worker_id: int):
    """DataLoader worker_init_fn: a worker ignores SIGINT and SIGTERM. Ctrl-C reaches every process of the terminal's
    group and a scheduler's SIGTERM every process of the job; the main process decides when to stop (train.py: at
    the next step boundary, after a checkpoint) and then ends its workers itself. A worker that died of the signal
    first would make the step that is still running fail ("DataLoader worker exited unexpectedly")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_detection(batch):
    """[(image, target), ...] -> (list of images, list of targets): detection images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_device(batch, device: torch.device):
    """Every tensor of a batch moved to `device`: a segmentation batch (two tensors) or a detection batch (a list
    of images and a list of target dicts), or any nesting of tuples, lists and dicts of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(x, device) for x in batch)
    return batch


def train_batches(dataset, batch_size: int, rank: int, world: int, seed: int, epoch: int, seen: int, workers: int,
                  collate=None):
    """Endless (epoch, seen, images, labels) for this rank, starting `seen` samples into `epoch`; collate: the
    task's (None: torch's default, stacking into tensors).

    Epoch e is the permutation rng(seed, e) of the dataset, cut to whole global micro-batches; rank r takes
    positions r, r + world, ... (DistributedSampler's split), batch_size at a time. After k batches on every rank
    exactly the first k * batch_size * world positions are consumed, so (epoch, seen) is the whole data state."""
    per_step = batch_size * world
    while True:
        n = len(dataset) // per_step * per_step
        if n == 0:
            raise ValueError(f"{len(dataset)} training samples make no micro-batch of {per_step}")
        mine = np.random.default_rng([seed, epoch]).permutation(len(dataset))[rank:n:world].tolist()
        batches = [mine[i:i + batch_size] for i in range(seen // world, n // world, batch_size)]
        dataset.set_epoch(epoch)  # before the loader forks its workers: they copy the dataset
        # A private generator: the loader's worker base seed must not consume the global RNG that dropout uses
        # (exact resume); the datasets draw from rng(seed, epoch, index) anyway.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=torch.cuda.is_available(),
                                             generator=torch.Generator().manual_seed(seed + epoch),
                                             collate_fn=collate, worker_init_fn=ignore_stop_signals)
        for k, (images, labels) in enumerate(loader, 1):
            yield epoch, seen + k * per_step, images, labels
        epoch, seen = epoch + 1, 0
