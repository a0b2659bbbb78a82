"""The multi-slide extraction job: every slide into one HDF5 patch store, safely.

Each slide is planned, read and labelled by `pretrain.extract`; here the patches are appended to
one HDF5 file (schema in `pretrain.store`). Several slides run in parallel processes
(forkserver/spawn: OpenSlide and HDF5 handles must not cross a fork from a parent that has them
open), or as one Ray task per slide (`--launcher ray`; on a cluster the slides, annotations and the
folder of `--out` must be on a filesystem every node shares); each worker writes a per-slide part file
that the parent merges in input order. A slide that
fails (unreadable file, patch larger than the level, malformed XML) is reported in the summary and
the others still complete.

What reaches `--out` (an existing store is never replaced by a worse or empty result):
- every slide extracted: the new store replaces `--out`; exit status 0;
- some slides failed and `--out` did not exist: the store of the others is written; exit status 1;
- some slides failed and `--out` exists: nothing is written, the old store (and its overlays and
  summary) stay as they were, and `ExtractionError` says so, naming the file and the failed slides;
- every slide failed: nothing is written; `ExtractionError` names the failed slides.
Cheap checks run before any tiling (config values, slide paths, the annotations folder, the output
folder, each slide's header, level and patch fit), so a bad flag costs seconds, not a night.

Nothing is half-written: the store goes to `.<name>.<pid>.tmp` beside `--out` (worker parts to
`.<name>.<pid>.parts/`, overlays to `.<overlays>.<pid>.tmp/`) and is renamed onto `--out` only at the
end. Temporaries are removed on every exit Python sees: errors, Ctrl-C, and SIGTERM/SIGHUP (turned into
`SystemExit` here unless the caller, e.g. `pretrain.cli`, already handles them). After a SIGKILL the
next run removes those whose pid is gone, and worker processes exit by themselves within a fraction
of a second of the extracting process disappearing.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import openslide
from tqdm import tqdm

from .annotations import match_annotations
from .extract import ExtractConfig, check_slide, plan_slide, read_patches, slide_summary
from .store import (
    StoreWriter,
    format_summary,
    pid_alive,
    prepare_output,
    remove_path,
    remove_stale,
    store_attrs,
    temp_sibling,
)
from .utils import atomic_write_json
from .wsi import find_slides, open_slide


class ExtractionError(ValueError):
    """Nothing was written: every slide failed, or `--out` exists and would lose slides. The message
    (one line) names the file and the failed slides; `summary` holds the per-slide results, when any."""

    def __init__(self, message: str, summary: list[dict] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or []


def _prefetch(it: Iterator, depth: int = 1) -> Iterator:
    """Run `it` one item ahead in a thread: OpenSlide decodes (GIL released) while HDF5 writes."""
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(next, it, None)
        while (item := fut.result()) is not None:
            fut = ex.submit(next, it, None)
            yield item


def _process_slide(path: str, xml: str | None, cfg: ExtractConfig, writer: StoreWriter, slide_index: int,
                   overlay_path: str | None, progress: bool = False) -> dict:
    """Plan, read and append one slide to `writer`; never raises for a bad slide (returns a failure)."""
    t0 = time.time()
    slide = None
    try:
        slide = open_slide(path)  # one handle for thumbnail and patches
        plan = plan_slide(path, xml, cfg, slide=slide)
        bar = tqdm(total=len(plan.coords), desc=plan.name, unit="patch", leave=False, disable=not progress)
        for _, imgs, masks in _prefetch(read_patches(plan, cfg, slide=slide)):
            writer.append(imgs, masks)
            bar.update(len(imgs))
        bar.close()
        writer.append_meta(plan.labels, plan.coords, slide_index, plan.tissue, plan.tumor)
    except (ValueError, openslide.OpenSlideError) as e:  # SlideError, PatchTooLargeError, AnnotationError, ...
        writer.rollback()
        return slide_summary(None, path, time.time() - t0, error=str(e))
    finally:
        if slide is not None:
            slide.close()
    overlay = None
    if overlay_path:
        from .overlay import save_overlay

        overlay = str(save_overlay(plan, cfg, overlay_path))
    return slide_summary(plan, path, time.time() - t0, overlay=overlay)


def _pool_context() -> mp.context.BaseContext:
    """"forkserver" (POSIX) with this module preloaded: each worker is forked from a clean server that
    never opened a slide or an HDF5 file, and the heavy imports happen once; "spawn" elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _start_time(pid: int) -> str | None:
    """Start time of a process (Linux /proc), to tell it from a later process that reuses its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _watch_parent(parent_pid: int, poll: float = 0.2) -> None:
    """Pool initializer: a thread that ends this worker when the extracting process is gone.

    A SIGKILLed parent runs no cleanup, and an idle pool worker would wait on its task queue for ever
    (it holds both ends of the queue's pipe, so it never sees end-of-file). Its real parent, the
    forkserver, is no help: it stays alive as long as any worker does. So each worker polls the
    extracting process's pid (a zombie or a newer process with the same pid counts as gone).
    """
    started = _start_time(parent_pid)

    def watch() -> None:
        while pid_alive(parent_pid) and _start_time(parent_pid) == started:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _worker(path: str, xml: str | None, cfg: ExtractConfig, part: str, overlay_path: str | None) -> dict:
    with StoreWriter(part, cfg.patch_size, cfg.save_masks, cfg.compression) as w:
        return _process_slide(path, xml, cfg, w, 0, overlay_path)


def _worker_failed(path: str, e: Exception) -> dict:
    """The summary of a slide whose worker crashed (e.g. a segfault inside a codec) or whose Ray task was lost."""
    return slide_summary(None, path, 0.0, error=f"{path}: worker failed ({type(e).__name__}: {e})")


def _kill_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Stop a pool now: drop queued slides and kill running workers, which write into the parts folder
    that is about to be removed (`shutdown` alone would wait for every running slide to finish)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.join(5)


def _run_pool(jobs: dict[int, tuple[str, str | None, str | None]], parts: dict[int, Path], cfg: ExtractConfig,
              workers: int) -> dict[int, dict]:
    """Slides {index: (path, xml, overlay)} in `workers` processes, each into its part file; summaries by index."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_watch_parent,
                                  initargs=(os.getpid(),))
    results: dict[int, dict] = {}
    try:
        futs = {pool.submit(_worker, p, x, cfg, str(parts[i]), o): i for i, (p, x, o) in jobs.items()}
        for f in tqdm(cf.as_completed(futs), total=len(futs), desc="slides", unit="slide"):
            i = futs[f]
            try:
                results[i] = f.result()
            except Exception as e:
                results[i] = _worker_failed(jobs[i][0], e)
    except BaseException:
        _kill_pool(pool)
        raise
    pool.shutdown()
    return results


def _run_ray(jobs: dict[int, tuple[str, str | None, str | None]], parts: dict[int, Path],
             cfg: ExtractConfig) -> dict[int, dict]:
    """`_run_pool`, with one Ray task of `cfg.ray_cpus` CPUs per slide; an interruption cancels the tasks
    (killing their workers) before the parts folder is removed."""
    from .raytasks import as_finished, ray_session, run_in, starts_local

    results: dict[int, dict] = {}
    with ray_session(cfg.ray_address) as ray:
        task = ray.remote(run_in).options(num_cpus=cfg.ray_cpus, name="extract_slide")
        refs = {task.remote(os.getcwd(), _worker, p, x, cfg, str(parts[i]), o): i for i, (p, x, o) in jobs.items()}
        with contextlib.closing(as_finished(ray, list(refs), cancel=not starts_local(cfg.ray_address))) as finished:
            for ref in tqdm(finished, total=len(refs), desc="slides", unit="slide"):
                i = refs[ref]
                try:
                    results[i] = ray.get(ref)
                except Exception as e:
                    results[i] = _worker_failed(jobs[i][0], e)
    return results


def _extract_all(writer: StoreWriter, jobs: list[tuple[str, str | None, str | None]], failed: dict[int, dict],
                 cfg: ExtractConfig, workers: int, parts_dir: Path) -> list[dict]:
    """Every slide not in `failed` into `writer` (in input order), one by one, in worker processes or
    as Ray tasks."""
    todo = [i for i in range(len(jobs)) if i not in failed]
    results = dict(failed)
    if not todo or (cfg.launcher == "local" and (workers == 1 or len(todo) < 2)):
        for i in tqdm(todo, desc="slides", unit="slide", disable=len(todo) < 2):
            p, x, o = jobs[i]
            results[i] = _process_slide(p, x, cfg, writer, i, o, progress=True)
    else:
        parts_dir.mkdir(parents=True, exist_ok=True)
        parts = {i: parts_dir / f"{i:05d}.part" for i in todo}  # not *.h5: no glob may take one for a store
        todo_jobs = {i: jobs[i] for i in todo}
        results.update(_run_ray(todo_jobs, parts, cfg) if cfg.launcher == "ray"
                       else _run_pool(todo_jobs, parts, cfg, min(workers, len(todo))))
        for i in todo:
            if results[i]["status"] == "ok":
                writer.merge(parts[i], slide_index=i)
    return [results[i] for i in range(len(jobs))]


def _refusal(out: Path, existed: bool, failed: list[dict], n_slides: int) -> str | None:
    """Why nothing may be written to `out` (the rule in the module docstring), or None. One line."""
    if not failed:
        return None
    by_reason: dict[str, list[str]] = {}  # "a.svs, b.svs: level 9 does not exist ..." rather than the reason twice
    for s in failed:
        err = " ".join(str(s["error"]).split())
        head = f"{s['path']}: "
        reason, who = (err[len(head):], Path(s["path"]).name) if err.startswith(head) else (err, "")
        by_reason.setdefault(reason, []).append(who)
    items = [f"{', '.join(w for w in who if w) or 'slides'}: {r}" for r, who in by_reason.items()]
    why = "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")
    if len(failed) == n_slides:
        return f"no slide could be extracted, {f'{out} left as it was' if existed else 'nothing written'}: {why}"
    if existed:
        return (f"{len(failed)} of {n_slides} slides failed, so the existing {out} is kept as it was (a store "
                f"without them would replace it; fix or drop those slides, or choose a new --out): {why}")
    return None


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) inside the block, so that `finally` clauses
    remove temporaries (their default action kills on the spot); SIGINT raises KeyboardInterrupt anyway.
    Only signals left at their default are taken, only in the main thread (elsewhere Python refuses);
    a second signal during the cleanup is ignored, so the cleanup finishes."""
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        sigs = []
    sigs = [s for s in sigs if signal.getsignal(s) == signal.SIG_DFL]

    def handler(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _precheck(slides: list[Path], cfg: ExtractConfig) -> dict[int, dict]:
    """Failed-slide summaries, by index, of the slides that fail `check_slide`."""
    failed = {}
    for i, p in enumerate(slides):
        try:
            check_slide(p, cfg)
        except (ValueError, openslide.OpenSlideError) as e:
            failed[i] = slide_summary(None, p, 0.0, error=str(e))
    return failed


def _publish_overlays(tmp_dir: Path, ov_dir: Path) -> None:
    """Move this run's overlay PNGs into `ov_dir`, one rename each (other files there are left alone)."""
    if not tmp_dir.is_dir():
        return
    ov_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(tmp_dir.iterdir()):
        os.replace(p, ov_dir / p.name)


def extract_patches(slides: list[str | os.PathLike] | None = None, annotations_dir: str | os.PathLike | None = None,
                    out: str | os.PathLike | None = None, cfg: ExtractConfig | None = None,
                    workers: int | None = None) -> list[dict]:
    """Extract every slide into one HDF5 store; returns the per-slide summary (failures included).

    Arguments left None come from `cfg`. Cheap checks come first (slide paths, annotations folder,
    output folder, then each slide's header and level); the store is written to a temporary beside
    `out` and renamed onto it as the module docstring's rule allows, with the summary in
    `<out stem>_summary.json` and overlays in `<out stem>_overlays/<slide>.png`; per-slide warnings
    are re-emitted here.

    Raises:
        ExtractionError: nothing was written (every slide failed, or `out` exists and some slide failed).
        ValueError / OSError: a problem with the whole job, found before any tiling (no slides, a missing
            path, duplicate slide names, a bad annotations folder or output path).
    """
    cfg = cfg or ExtractConfig()
    slides = find_slides(list(slides if slides is not None else cfg.slides))
    if not slides:
        raise ValueError("no slides given; pass --slides PATH [PATH ...]")
    names = [p.stem for p in slides]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"slide names must be unique (they become slide ids); repeated: {dup}")
    ann_dir = annotations_dir if annotations_dir is not None else cfg.annotations
    xmls = match_annotations(ann_dir, names)
    out = Path(out if out is not None else cfg.out)
    workers = max(1, min(workers or cfg.workers, len(slides)))
    ov_dir = Path(cfg.overlay_dir) if cfg.overlay_dir else out.with_name(out.stem + "_overlays")
    existed = out.exists()
    with _signals_raise():
        tmp = prepare_output(out)
        parts_dir, ov_tmp = temp_sibling(out, "parts"), temp_sibling(ov_dir, "tmp")
        try:
            if cfg.overlays:
                try:
                    ov_dir.parent.mkdir(parents=True, exist_ok=True)
                    remove_stale(ov_dir)
                    ov_tmp.mkdir()
                except OSError as e:
                    raise type(e)(f"overlay folder {ov_dir}: cannot write beside it ({e.strerror or e}); "
                                  f"choose another --overlay-dir or pass --overlays false") from e
            failed = _precheck(slides, cfg)
            if why := _refusal(out, existed, list(failed.values()), len(slides)):
                raise ExtractionError(why)
            jobs = [(str(p), x, str(ov_tmp / f"{n}.png") if cfg.overlays else None)
                    for p, x, n in zip(slides, xmls, names, strict=True)]
            with StoreWriter(tmp, cfg.patch_size, cfg.save_masks, cfg.compression) as writer:
                summary = _extract_all(writer, jobs, failed, cfg, workers, parts_dir)
                for s, x, n in zip(summary, xmls, names, strict=True):
                    if s["status"] == "ok" and ann_dir is not None and x is None:
                        s["annotations_missing"] = str(Path(ann_dir) / f"{n}.xml")
                    if s.get("overlay"):
                        s["overlay"] = str(ov_dir / f"{n}.png")
                    for m in s.get("warnings", []):
                        warnings.warn(m, stacklevel=2)
                writer.finish(names, store_attrs(cfg, summary))
            if why := _refusal(out, existed, [s for s in summary if s["status"] != "ok"], len(slides)):
                raise ExtractionError(why, summary)
            os.replace(tmp, out)
            _publish_overlays(ov_tmp, ov_dir)
            atomic_write_json(out.with_name(out.stem + "_summary.json"), summary)
        finally:
            for p in (tmp, parts_dir, ov_tmp):
                remove_path(p)
    return summary


def run(cfg: ExtractConfig) -> int:
    """Command-line job: extract and print the summary table.

    Returns 0 when every slide was extracted, 1 when some failed (the store then holds the others).
    Raises ExtractionError (after printing the table, when slides were tiled) when nothing was written.
    """
    try:
        summary = extract_patches(cfg=cfg)
    except ExtractionError as e:
        if e.summary:
            print(format_summary(e.summary))
        raise
    print(format_summary(summary, cfg.out))
    return 1 if any(s["status"] != "ok" for s in summary) else 0
