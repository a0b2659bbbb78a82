"""Data-parallel pretraining under `torchrun` (DistributedDataParallel): the plumbing, in one place.

    torchrun --standalone --nproc_per_node 4 scripts/pretrain_cam16.py --data PATCHES ...

`session(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). With WORLD_SIZE
absent or 1 it does nothing: the run is the plain single process, with the same numbers as without
torchrun. With several processes it picks cuda:LOCAL_RANK and the "nccl" backend when CUDA is used,
else the CPU and "gloo", starts the process group and ends it on the way out.

How the training functions use it, and why:

- Batch. `batch_size` stays the global batch; each rank takes `per_rank_batch(batch_size)` =
  batch_size / world (a ValueError names both numbers when it does not divide). The training loader
  draws from `DistributedSampler(shuffle, seed)` with `set_epoch(epoch)` every epoch: its order is
  `randperm(n)` seeded by seed + epoch and rank r takes positions r, r + W, ..., so the ranks' k-th
  batches together are exactly the k-th global batch of that order. DDP averages the gradients of
  the ranks' batch means, which is the gradient of the global batch's mean: one step equals a step
  of one process with the global batch. (A single process shuffles with its own generator, so its
  order differs; tests compare on data where an epoch is one global batch.)
- Metrics. Each rank's per-sample sums and counts are gathered and summed in rank order
  (`reduce_meter`): the logged means are global and bit-identical on every rank, so every rank
  takes the same ReduceLROnPlateau, best-model and early-stop decisions.
- Validation and test runs on every rank over a strided shard (`eval_shard`, no padding), after
  rank 0's BatchNorm buffers are broadcast (`sync_buffers`): all ranks evaluate the model that
  rank 0 saves, and the reduced means equal one process's over the whole set.
- BatchNorm. On CUDA, `wrap` turns BatchNorm layers into SyncBatchNorm, so the statistics are those
  of the global batch, as in one process. SyncBatchNorm has no CPU implementation (torch raises
  "SyncBatchNorm expected input tensor to be on GPU"), so on CPU each rank normalises over its own
  batch_size / world samples and the losses differ from one process's by that sampling noise;
  models with group or layer norm match to rounding.
- Writing. Only rank 0 writes (config, log, checkpoints, training state, plots) and prints: the
  steps that touch the run folder run through `on_main`, which broadcasts their result (or their
  error) to every rank. Other ranks' stdout goes to os.devnull and their warnings are dropped
  (rank 0 shows the same ones); their errors still reach stderr. Checkpoints hold the plain
  module's state dict (`unwrap`), so `load_encoder` is unchanged.
- Resuming. Rank 0 reads last.pt and broadcasts it; every rank's random streams are gathered into
  it each epoch (`gather_object`), so each rank continues its own and a resumed run equals an
  uninterrupted one. A state saved by another number of processes is refused (`pretrain.resume`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .engine import Meter
from .utils import get_device

T = TypeVar("T")


def env_world_size() -> int:
    """Number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only process that writes files and prints (always True alone)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def rank_device(name: str | None, world: int) -> torch.device:
    """`get_device(name)`; with several processes on CUDA, cuda:LOCAL_RANK.

    Raises:
        ValueError: a single GPU is named ("cuda:1") for several processes, or LOCAL_RANK has no GPU.
    """
    device = get_device(name)
    if world <= 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {name} names one GPU, but torchrun started {world} processes; pass "
                         f"--device cuda or auto: each process takes cuda:LOCAL_RANK")
    local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= n:
        raise ValueError(f"LOCAL_RANK {local} has no GPU: this machine has {n}; start at most {n} "
                         f"processes per machine (torchrun --nproc_per_node {n})")
    return torch.device("cuda", local)


@contextlib.contextmanager
def session(device: str | None = "auto") -> Iterator[torch.device]:
    """The compute device for this process; under torchrun with several processes, the process group
    for the body (nccl on CUDA, gloo on CPU), destroyed on the way out.

    Does nothing else alone (WORLD_SIZE absent or 1) or when the caller already started a group.
    """
    world = env_world_size()
    dev = rank_device(device, world)
    if world <= 1 or dist.is_initialized():
        yield dev
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)  # bound to its GPU: collectives need no guess
    else:
        dist.init_process_group("gloo")
    try:
        if not is_main():  # every rank runs the same script: its printed result should appear once
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # for the rest of the process
            warnings.simplefilter("ignore")
        yield dev
        barrier()
    finally:
        dist.destroy_process_group()


def per_rank_batch(batch_size: int) -> int:
    """Each rank's share of the global `batch_size`.

    Raises:
        ValueError: batch_size is not a multiple of the number of processes.
    """
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes torchrun started; "
                         f"give a multiple of {world} (it is the global batch: each process takes batch_size / {world})")
    return batch_size // world


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This rank's shuffled share of `dataset` (call `set_epoch(e)` every epoch); None alone, where the
    loader shuffles with its own generator as it always did."""
    if world_size() == 1:
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def eval_shard(n: int) -> range | None:
    """Indices rank, rank + W, ... of n evaluation items (no padding: each item counted once); None alone."""
    return None if world_size() == 1 else range(rank(), n, world_size())


def gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_shards(values: np.ndarray) -> np.ndarray:
    """Undo `eval_shard`: each rank's (n_r, ...) results -> (n, ...) in the original item order."""
    parts = gather_object(values)
    if len(parts) == 1:
        return values
    out = np.empty((sum(len(p) for p in parts), *values.shape[1:]), dtype=values.dtype)
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


def reduce_meter(meter: Meter) -> Meter:
    """The meter over all ranks: per-sample sums and counts added in rank order, so that the
    averages are the global ones and bit-identical on every rank. Alone, `meter` itself."""
    if world_size() == 1:
        return meter
    parts = [(n, s) for n, s in gather_object((meter.n, meter.sums)) if n]  # a rank may get no item
    keys = list(parts[0][1]) if parts else []  # rank 0's order: the log's columns as when alone
    if any(sorted(s) != sorted(keys) for _, s in parts):
        raise RuntimeError(f"ranks logged different metrics: {[sorted(s) for _, s in parts]}")
    total = Meter()
    total.n = sum(n for n, _ in parts)
    total.sums = {k: sum(s[k] for _, s in parts) for k in keys}
    return total


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The ranks' mean of tensor `x` (detached; the same on every rank); `x` itself alone."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (SyncBatchNorm first on CUDA); `model` itself alone.

    Train through the wrapper; save, evaluate and copy weights with `unwrap(wrapper)`.
    """
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (its state dict has no `module.`)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _portable(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__} on rank 0: {e}")


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on rank 0 only; its result, or its exception, on every rank.

    For the steps that write the run folder or read it (config check, training state, publishing):
    other ranks wait, then take rank 0's answer, so all of them raise the same error or go on alike.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    payload: list = [None]
    error = None
    if is_main():
        try:
            payload[0] = (True, fn(*args, **kwargs))
        except Exception as e:
            error = e
            payload[0] = (False, _portable(e))
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if ok:
        return value
    raise error if error is not None else value
