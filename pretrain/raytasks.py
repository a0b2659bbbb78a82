"""Ray plumbing shared by the jobs that fan their work out as Ray tasks (sweep runs, slides).

Ray is an optional dependency (`pip install '.[distributed]'`), imported only here and only when a
`--launcher ray` job starts. `ray_session(address)` connects to a running cluster (`auto`, `HOST:6379`,
or `$RAY_ADDRESS`), or starts a local instance limited to this machine's CPUs when no address is given.
A local instance belongs to this process: it is shut down when the block ends or the interpreter exits
(SIGTERM included). After a SIGKILL its raylet, GCS and workers die within seconds; its two agent
processes (dashboard and runtime-env agents, idle) exit by themselves about a minute later.

Every task runs `run_in(driver's working directory, fn, *args)`: relative paths mean on a worker what
they mean to the driver, provided that folder exists on every node (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

LAUNCHERS = ("local", "ray")
T = TypeVar("T")


def check_launcher(launcher: str) -> str:
    """`launcher` if it is one of LAUNCHERS; a ValueError listing them otherwise."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {list(LAUNCHERS)}, got {launcher!r}")
    return launcher


def import_ray() -> ModuleType:
    """The `ray` module; a ValueError (one line on the command line) saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--launcher ray needs Ray, which is not installed for {sys.executable}: "
                         f"pip install '.[distributed]' in the checkout, or use --launcher local") from e
    return ray


def starts_local(address: str = "") -> bool:
    """True when `ray_session(address)` starts (and owns) a local instance rather than joining a cluster."""
    return not (address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(address: str = "") -> Iterator[ModuleType]:
    """Ray, connected for the block; no dashboard, Ray's own logging at errors only.

    A Ray already initialised in this process (by a notebook, a test) is used as it is and left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    local = starts_local(address)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(address=address or None, num_cpus=os.cpu_count() if local else None, include_dashboard=False,
             logging_level=logging.ERROR)
    if callable(handler):  # ray.init replaces it with sys.exit(15); keep the caller's (pretrain.cli: exit 143)
        signal.signal(signal.SIGTERM, handler)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_in(cwd: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the driver's working directory `cwd`, which the job's relative paths refer to: the
    body of every task these launchers submit (a worker on another node starts elsewhere)."""
    if not Path(cwd).is_dir():
        raise FileNotFoundError(f"Ray worker on {socket.gethostname()}: the driver's working directory {cwd} "
                                f"does not exist here; the job's files must be on a filesystem every node shares")
    os.chdir(cwd)
    return fn(*args)


def as_finished(ray: ModuleType, refs: list, cancel: bool = True) -> Iterator:
    """Yield each object ref of `refs` as its task finishes (any order). When the caller stops early (an
    error, Ctrl-C, SIGTERM) and `cancel`, the unfinished tasks are cancelled. Callers that own a local
    instance pass `cancel=False` and let `ray.shutdown` end its workers: cancelling a task while its reply
    arrives can abort the driver in Ray 2.60 ("Tried to complete task that was not pending"), which turned
    a clean SIGTERM exit into a crash (seen in about one kill in three here)."""
    pending = list(refs)
    try:
        while pending:  # a timeout, so that signal handlers run between waits
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            yield from done
    finally:
        for ref in pending if cancel else ():
            ray.cancel(ref, force=True)
