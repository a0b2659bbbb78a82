"""Shared helpers used by every stage: seeding, device choice, atomic writes, run folders, logs.

`fusion` imports these; nothing here imports `fusion`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU and CUDA); return a torch.Generator seeded the same way.

    cuDNN autotuning is switched off so that the same seed gives the same numbers on one machine.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: derive numpy/random seeds from torch's per-worker seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


def get_device(name: str | None = "auto") -> torch.device:
    """Pick the compute device: CUDA when present, else CPU; `name` ("cpu", "cuda", "cuda:1") overrides.

    Raises:
        ValueError: when CUDA is requested but not available.
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return dev


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (atomic on POSIX).

    The parent folder is created when missing. If the body raises (or the process is killed),
    `path` keeps its previous content and the temporary file is removed where possible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and flush it to disk (a killed run keeps every finished line).

    A torn last line (a writer killed mid-line) is cut off first: appended to, it would swallow this
    row too, since the reader skips a line that is not valid JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(max(0, size - (1 << 20)))
                tail = f.read()
                cut = tail.rfind(b"\n")
                f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Replace a JSON-lines file by `rows`, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class FolderLockedError(OSError):
    """Another process holds the lock of a run folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the body; refuse when another
    process holds it.

    The lock is `fcntl.flock` on `folder/name`: the kernel releases it when its holder dies, even by
    SIGKILL, so a lock is never stale; the file is removed on a clean exit.

    Raises:
        FolderLockedError: another live process holds the lock; the message names it and its pid.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise FolderLockedError(f"{folder} is in use by another process (pid {holder}, lock file {path}); "
                                    f"wait for it to finish or use another output folder") from None
        try:  # the holder before us may have removed the file after we opened it: lock the live one
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so nobody locks a file about to vanish
        f.close()  # releases the lock


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a truncated last line (from a killed writer) is ignored."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def make_run_dir(root: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
    """Create `root/name` (name defaults to a timestamp) and return it.

    An existing non-empty folder is reused as is (resume) unless `overwrite`, which empties it.
    """
    name = name or time.strftime("%Y%m%d-%H%M%S")
    run = Path(root) / name
    if run.exists() and overwrite:
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fingerprint_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None,
                      content: bool = True) -> str:
    """A short hex fingerprint of a set of files: relative paths plus content hashes (or sizes).

    `content=False` hashes (path, size) only, for multi-GB slides where reading every byte is too slow.
    """
    h = hashlib.sha256()
    items = []
    for p in paths:
        p = Path(p)
        rel = str(p.relative_to(root)) if root is not None else p.name
        items.append((rel, p))
    for rel, p in sorted(items):
        h.update(rel.encode())
        h.update((sha256_file(p) if content else str(p.stat().st_size)).encode())
    return h.hexdigest()[:16]


def eval_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches over n items for inference. A lone last item joins the batch
    before it: on a CPU a batch of one takes another kernel path and can change the last bits of its
    output, while any other batch size gives the same numbers (benchmarks/real_study/NOTES.md)."""
    bounds = [*range(0, n, max(1, batch_size)), n]
    if len(bounds) > 2 and n - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
