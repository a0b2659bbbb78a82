"""`launcher: ray`: a sweep's runs as Ray tasks, on this machine or on a Ray cluster.

    python scripts/sweep.py --config configs/sweep.yaml --launcher ray [--ray-address auto] [--ray-gpus 0.25]

A unit of work is a list of runs (`RunConfig`s) that one task trains with `ray_cpus`
CPUs and `ray_gpus` GPUs (a fraction lets tasks share a GPU): one run, or with `batch_runs` a group of runs
trained at once as one batched model (fusion/batched.py). A task
loads the images from the decode-once cache and the splits from the files the driver saved
(`fusion.sweep.worker_context`, as a local worker process does), once per Ray worker process, and
trains with `worker_threads` torch threads. Each task writes its run folders under `out`; its result
rows come back to the driver as it finishes and are appended to `results.jsonl` there, as with the
local launcher, so an interrupted sweep resumes by running the same command again. A task whose
worker dies (a lost node) is retried by Ray; the retry trains the run again in the same folder.

On a cluster every node must see the same files at the same paths: `out`, `data`, `cache_dir`, the
split files and the encoder checkpoints must lie on a shared filesystem, and each node needs this
package installed (the same environment). Relative paths are taken from the driver's working
directory (`pretrain.raytasks.run_in`), which must exist on every node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from pretrain.config import to_plain
from pretrain.raytasks import as_finished, ray_session, run_in, starts_local

from .sweep import SweepConfig, SweepContext, run_unit, worker_context
from .train import RunConfig

_CONTEXT: dict[str, SweepContext] = {}  # per Ray worker process, one entry: reused by its later tasks


def _context_key(cfg: SweepConfig, split_paths: list[str]) -> str:
    """What the loaded context depends on: the image settings and the split files (with their mtimes)."""
    splits = [(p, Path(p).stat().st_mtime_ns) for p in split_paths]
    return json.dumps(to_plain([cfg.data, cfg.image_size, cfg.cache_dir, cfg.classes, cfg.preprocess,
                                cfg.worker_threads, splits]), default=str)


def task_unit(cfg: SweepConfig, split_paths: list[str], specs: list[RunConfig]) -> list[dict]:
    """One task: train the unit `specs` in this worker process; their result rows, in the same order."""
    import torch

    key = _context_key(cfg, split_paths)
    if key not in _CONTEXT:
        _CONTEXT.clear()  # one sweep's images in memory at a time
        _CONTEXT[key] = worker_context(cfg, split_paths)
    torch.set_num_threads(cfg.worker_threads)
    return run_unit(specs, _CONTEXT[key])


def ray_results(units: list[list[RunConfig]], cfg: SweepConfig, split_paths: list[str]) -> Iterator[dict]:
    """Submit each unit as one Ray task and yield the result rows of each task as it finishes."""
    with ray_session(cfg.ray_address) as ray:
        task = ray.remote(run_in).options(num_cpus=cfg.ray_cpus, num_gpus=cfg.ray_gpus, name="sweep_runs")
        cfg_ref = ray.put(cfg)  # sent once, not once per task
        refs = [task.remote(os.getcwd(), task_unit, cfg_ref, split_paths, unit) for unit in units]
        with closing(as_finished(ray, refs, cancel=not starts_local(cfg.ray_address))) as finished:  # before shutdown
            for ref in finished:
                yield from ray.get(ref)
