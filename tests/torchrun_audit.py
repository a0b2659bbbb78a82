"""Run a script as torchrun's worker while recording what it writes (for tests/test_torchrun.py).

    torchrun ... tests/torchrun_audit.py AUDIT_DIR WATCHED_DIR [--die-after-epoch K] SCRIPT [ARGS ...]

Python's audit hooks see every file opened for writing, created, renamed, copied or removed through
Python. (torch.save to a path writes from C++ unseen, but our atomic writes first create their
temporary file with mkstemp, which is seen.) Each rank writes the paths under WATCHED_DIR that it
touched to AUDIT_DIR/rank<r>.json when it exits normally.

`--die-after-epoch K`: rank 0 exits at once (os._exit, no cleanup) right after saving epoch K's
training state, as a job killed between two epochs would; torchrun then stops the other ranks.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _paths(event: str, args: tuple) -> list:
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        return [path] if writes else []
    if event in ("os.rename", "shutil.copyfile", "shutil.copytree", "shutil.move"):
        return list(args[:2])
    if event in ("os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "os.symlink", "os.link"):
        return [args[0]]
    return []


def main(argv: list[str]) -> None:
    audit_dir, watched, rest = Path(argv[0]), Path(argv[1]).resolve(), argv[2:]
    die_after = None
    if rest[0] == "--die-after-epoch":
        die_after, rest = int(rest[1]), rest[2:]
    rank = int(os.environ.get("RANK", "0"))
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        for p in _paths(event, args):
            if isinstance(p, (str, os.PathLike)) and Path(os.path.abspath(p)).is_relative_to(watched):
                seen.append(f"{event} {p}")

    sys.addaudithook(hook)
    atexit.register(lambda: (audit_dir / f"rank{rank}.json").write_text(json.dumps(seen)))
    if die_after is not None and rank == 0:
        import pretrain.train_cam16 as tc
        import pretrain.train_prcc as tp

        for mod in (tp, tc):
            real = mod.save_state

            def save_then_die(path, state, _real=real, **kw):
                _real(path, state, **kw)
                if state["epoch"] == die_after:
                    os._exit(3)

            mod.save_state = save_then_die
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
