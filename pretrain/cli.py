"""The top of every script: the package's own errors as one line, the traceback only under `--debug`.

    if __name__ == "__main__":
        sys.exit(cli(main))

A user who gives a bad file or value wants to read what is wrong, which file, and what to do; a
30-line traceback through the library hides that line at the bottom. Errors the package raises on
bad input are `ValueError`s (config, images, checkpoints, splits) or `OSError`s (missing or
unwritable files); both print `error: <message>` on stderr and exit 1. Anything else is a bug and
keeps its traceback. Ctrl-C and SIGTERM print one line and exit 130 / 143 after the `finally`
blocks of the library (temporary files, locks) have run.
"""

from __future__ import annotations

import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup (`finally`, context managers) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined), never empty."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def cli(main: Callable[[list[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and turn its outcome into an exit status.

    Returns main's int result (e.g. 1 when some slides failed), else 0; 1 for a package error,
    130 for Ctrl-C, 143 for SIGTERM. `--debug` anywhere in argv re-raises with the full traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    old_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _short_warning  # one line per warning, not the source line too
    old = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        out = main(args)
    except Terminated:
        print("terminated: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}" + ("" if debug else "  (--debug shows the traceback)"), file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = old_format
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return out if isinstance(out, int) and not isinstance(out, bool) else 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
