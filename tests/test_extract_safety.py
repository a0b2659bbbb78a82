"""Patch extraction never loses or corrupts a store: bad inputs are refused before any tiling, an existing
store is never replaced by a worse or empty one, and a killed run leaves nothing behind once rerun."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from pretrain.config import parse_config
from pretrain.extract import ExtractConfig
from pretrain.extract_job import ExtractionError, extract_patches, run
from pretrain.store import prepare_output, remove_stale, temp_sibling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, "scripts/extract_patches.py"]
KEYS = ("images", "labels", "coords", "slide_index", "tissue", "tumor", "slide_names")
#: Small patches on a fine grid: ~9,000 patches from the two demo slides, about a second of work,
#: long enough to kill a run in the middle.
FINE = ["--patch-size", "16", "--stride", "8"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f[k][:] for k in KEYS}


def assert_same_store(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for k in KEYS:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def listing(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (relative name -> sha256, or "dir")."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else sha(p)) for p in sorted(folder.rglob("*"))}


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (the extraction, its forkserver and workers inherit it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if tag.encode() in env and state != "Z":
                pids.append(int(d.name))
    return pids


def wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def slides(demo_root):
    return demo_root / "cam16" / "slides", demo_root / "cam16" / "annotations"


@pytest.fixture(scope="module")
def good_store(slides, tmp_path_factory):
    """A finished store of the first demo slide (64 px patches), copied by each test that needs one."""
    out = tmp_path_factory.mktemp("good") / "good.h5"
    extract_patches([slides[0] / "demo_slide_0.tif"], slides[1], out, ExtractConfig(patch_size=64, overlays=False))
    return out


@pytest.fixture
def existing(good_store, tmp_path):
    """tmp_path/p.h5: a copy of a good store, as a user's earlier result would be."""
    out = tmp_path / "p.h5"
    out.write_bytes(good_store.read_bytes())
    return out


# ----------------------------------------------------------------------------- bad inputs, refused early

def _junk(tmp_path: Path) -> str:
    p = tmp_path / "in" / "junk.svs"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"\0" * 200)
    return str(p)


def _file_as_folder(tmp_path: Path) -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "afile").write_text("x")
    return str(tmp_path / "in" / "afile" / "p.h5")


BAD = {  # id: (extra argv, or a function of tmp_path giving it; expected exception; text the message names)
    "mpp_zero": (["--mpp", "0"], ValueError, "--mpp must be a positive number"),
    "mpp_negative": (["--mpp", "-0.5"], ValueError, "got -0.5"),
    "mpp_nan": (["--mpp", "nan"], ValueError, "--mpp"),
    "downsample_zero": (["--downsample", "0"], ValueError, "--downsample"),
    "level_negative": (["--level", "-1"], ValueError, "--level must be"),
    "level_beyond_slide": (["--level", "9"], ExtractionError, "level 9 does not exist; the slide has levels 0..2"),
    "patch_size_zero": (["--patch-size", "0"], ValueError, "--patch-size must be .* got 0"),
    "patch_size_negative": (["--patch-size", "-64"], ValueError, "got -64"),
    "patch_larger_than_slide": (["--patch-size", "4096"], ExtractionError, "a 4096 px patch"),
    "stride_zero": (["--stride", "0"], ValueError, "--stride must be .* got 0"),
    "stride_negative": (["--stride", "-8"], ValueError, "got -8"),
    "workers_zero": (["--workers", "0"], ValueError, "--workers"),
    "tissue_threshold": (["--tissue-threshold", "2"], ValueError, "--tissue-threshold must lie in"),
    "compression": (["--compression", "zip"], ValueError, "'zip'"),
    "out_not_h5": (lambda t: ["--out", str(t / "p.txt")], ValueError, "p.txt: a patch store must end in .h5"),
    "out_is_folder": (lambda t: ["--out", str(t / "dir.h5")], IsADirectoryError, "dir.h5 is a folder"),
    "out_in_a_file": (lambda t: ["--out", _file_as_folder(t)], OSError, "afile"),
    "out_unwritable": (lambda t: ["--out", "/sys/wbc_extract_test.h5"], OSError, "cannot write in /sys"),
    "slide_missing": (lambda t: ["--slides", str(t / "nope.svs")], FileNotFoundError, "nope.svs does not exist"),
    "slide_broken": (lambda t: ["--slides", _junk(t)], ExtractionError, "junk.svs: cannot read slide"),
    "one_slide_broken": (lambda t: ["--slides", str(t / "demo"), _junk(t)], ExtractionError,
                         "1 of 3 slides failed, so the existing .*p.h5 is kept as it was.*junk.svs"),
    "annotations_missing": (lambda t: ["--annotations", str(t / "nowhere")], FileNotFoundError, "nowhere"),
    "annotations_a_file": (lambda t: ["--annotations", str(t / "p.h5")], NotADirectoryError, "is not a folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_existing_store_untouched(case, existing, slides, tmp_path):
    extra, exc, text = BAD[case]
    (tmp_path / "dir.h5").mkdir()
    (tmp_path / "demo").symlink_to(slides[0])
    extra = extra(tmp_path) if callable(extra) else extra
    argv = ["--slides", str(slides[0]), "--out", str(existing), "--patch-size", "64", *extra]
    before = listing(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(exc, match=text) as e:
        cfg, _ = parse_config(ExtractConfig, argv)
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert listing(tmp_path) == before  # the store, and everything beside it, as it was: no temp files
    assert time.perf_counter() - t0 < 5  # refused before any tiling


def test_partial_failure_without_existing_store_writes_the_others(slides, tmp_path, capsys):
    out = tmp_path / "new.h5"
    cfg, _ = parse_config(ExtractConfig, ["--slides", str(slides[0]), _junk(tmp_path), "--out", str(out),
                                          "--patch-size", "64", "--overlays", "false"])
    assert run(cfg) == 1
    assert "1 slide(s) failed" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert [s.decode() for s in f["slide_names"][:]] == ["demo_slide_0", "demo_slide_1", "junk"]
        assert set(f["slide_index"][:]) == {0, 1}


def test_failure_found_while_tiling_keeps_existing_store(existing, tmp_path):
    """A malformed XML passes the header checks and fails only while tiling: the old store still stays."""
    from wsi_fakes import write_fake_slide

    a, _ = write_fake_slide(tmp_path, "slide_a")
    b, _ = write_fake_slide(tmp_path, "slide_b")
    (tmp_path / "annotations" / "slide_b.xml").write_text("<ASAP_Annotations><Annotations>")
    before = sha(existing)
    with pytest.raises(ExtractionError, match="1 of 2 slides failed.*slide_b.xml: line 1, column 31") as e:
        extract_patches([a, b], tmp_path / "annotations", existing, ExtractConfig(patch_size=64))
    assert [s["status"] for s in e.value.summary] == ["ok", "failed"]
    assert sha(existing) == before and not (tmp_path / "p_overlays").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "p.h5", "slides"]


def test_all_slides_ok_replaces_existing_store(existing, slides, tmp_path):
    summary = extract_patches([slides[0]], slides[1], existing, ExtractConfig(patch_size=64))
    assert [s["status"] for s in summary] == ["ok", "ok"]
    with h5py.File(existing) as f:
        assert f["slide_names"].shape == (2,)
    assert sorted(p.name for p in (tmp_path / "p_overlays").iterdir()) == ["demo_slide_0.png", "demo_slide_1.png"]
    assert summary[0]["overlay"] == str(tmp_path / "p_overlays" / "demo_slide_0.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_real_broken_slide_keeps_existing_store(shared_data, existing):
    broken = shared_data("wsi", "bad", "broken.svs")
    before = sha(existing)
    r = subprocess.run([*SCRIPT, "--slides", str(broken), "--out", str(existing)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "broken.svs" in r.stderr and sha(existing) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == ["p.h5"]


def test_annotations_folder_matching_no_slide_warns(slides, tmp_path, capsys):
    wrong = tmp_path / "wrong_annotations"
    wrong.mkdir()
    (wrong / "tumor_001.xml").write_text("<ASAP_Annotations/>")
    with pytest.warns(UserWarning, match=r"annotations folder .*wrong_annotations has no XML for any of the 2 "
                                         r"slide\(s\): looked for demo_slide_0.xml, demo_slide_1.xml, it holds "
                                         r"tumor_001.xml; every patch will be labelled normal"):
        cfg, _ = parse_config(ExtractConfig, ["--slides", str(slides[0]), "--annotations", str(wrong), "--out",
                                              str(tmp_path / "p.h5"), "--patch-size", "64", "--overlays", "false"])
        assert run(cfg) == 0
    assert "WARNING: no annotation XML for any slide" in capsys.readouterr().out


def test_some_slides_without_xml_get_a_note(slides, tmp_path, capsys):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "demo_slide_1.xml").write_bytes((slides[1] / "demo_slide_1.xml").read_bytes())
    cfg, _ = parse_config(ExtractConfig, ["--slides", str(slides[0]), "--annotations", str(ann), "--out",
                                          str(tmp_path / "p.h5"), "--patch-size", "64", "--overlays", "false"])
    assert run(cfg) == 0
    text = capsys.readouterr().out
    assert "note: no annotation XML for 1 slide(s), all their patches are normal: demo_slide_0" in text


# ----------------------------------------------------------------------------- temporaries and kills

def test_stale_temporaries_of_dead_runs_are_removed(existing, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [temp_sibling(existing, "tmp", dead.pid), temp_sibling(existing, "parts", dead.pid),
             tmp_path / "p.h5.tmp", tmp_path / "p.h5.parts"]
    for p in stale:
        p.mkdir() if p.name.endswith("parts") else p.write_bytes(b"half a store")
    alive = temp_sibling(existing, "tmp", os.getppid())  # a concurrent run that is still going: kept
    alive.write_bytes(b"busy")
    tmp = prepare_output(existing)
    assert tmp == temp_sibling(existing) and tmp.exists() and tmp.name == f".p.h5.{os.getpid()}.tmp"
    assert not any(p.exists() for p in stale) and alive.exists()
    tmp.unlink()
    assert remove_stale(existing) == []


def _start(argv: list[str], tag: str) -> subprocess.Popen:
    env = dict(os.environ, WBC_EXTRACT_TEST_TAG=tag)
    return subprocess.Popen([*SCRIPT, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _interrupt_and_rerun(slides, tmp_path, existing, workers: int, sig: int, seed: int) -> subprocess.Popen:
    """Start an extraction over `existing`, send `sig` at a random point while slides are being tiled, check
    that the old store is intact and no process is left, then rerun and compare with an uninterrupted run."""
    argv = ["--slides", str(slides[0]), "--annotations", str(slides[1]), *FINE, "--workers", str(workers)]
    ref = tmp_path / "ref" / "ref.h5"
    cfg, _ = parse_config(ExtractConfig, [*argv, "--out", str(ref), "--workers", "1", "--overlays", "false"])
    assert run(cfg) == 0
    before, tag = sha(existing), uuid.uuid4().hex
    proc = _start([*argv, "--out", str(existing)], tag)
    # busy: the temp store has data (one worker) or a worker has opened its part file (two)
    if workers == 1:
        busy = lambda: temp_sibling(existing, "tmp", proc.pid).exists()  # noqa: E731
    else:
        busy = lambda: any(temp_sibling(existing, "parts", proc.pid).glob("*.part"))  # noqa: E731
    assert wait_for(lambda: busy() or proc.poll() is not None, 60)
    time.sleep(np.random.default_rng(seed).uniform(0.0, 0.4))
    proc.send_signal(sig)
    proc.wait(60)
    if proc.returncode == 0:  # finished before the signal: a complete result, also fine
        assert_same_store(existing, ref)
    else:
        assert sha(existing) == before  # nothing lost: the old store byte for byte
    assert wait_for(lambda: not tagged_pids(tag), 10), f"orphan processes: {tagged_pids(tag)}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "p.h5" and p.name != "ref"]
    assert all(n.startswith(".p") and n.endswith((".tmp", ".parts")) for n in leftovers), leftovers
    rerun = _start([*argv, "--out", str(existing)], tag)
    assert rerun.wait(120) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "p_overlays", "p_summary.json", "ref"]
    assert_same_store(existing, ref)
    assert wait_for(lambda: not tagged_pids(tag), 10)  # the forkserver exits a moment after its owner
    return proc


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_loses_nothing_and_rerun_matches(slides, tmp_path, existing, workers):
    proc = _interrupt_and_rerun(slides, tmp_path, existing, workers, signal.SIGKILL, seed=workers)
    assert proc.returncode in (-signal.SIGKILL, 0)


#: `python -c` for the library alone, without the script's handler: SIGTERM must still run the cleanup.
LIBRARY = [sys.executable, "-c", "import sys; from pretrain.extract import ExtractConfig; "
           "from pretrain.extract_job import extract_patches; "
           "extract_patches([sys.argv[1]], None, sys.argv[2], ExtractConfig(patch_size=16, stride=8, "
           "workers=int(sys.argv[3])))"]


@pytest.mark.parametrize("workers, entry", [(1, "library"), (2, "script")])
def test_sigterm_cleans_up_at_once(slides, tmp_path, existing, workers, entry):
    tag = uuid.uuid4().hex
    if entry == "script":
        proc = _start(["--slides", str(slides[0]), *FINE, "--workers", str(workers), "--out", str(existing)], tag)
    else:
        proc = subprocess.Popen([*LIBRARY, str(slides[0]), str(existing), str(workers)], cwd=ROOT,
                                env=dict(os.environ, WBC_EXTRACT_TEST_TAG=tag), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    before = sha(existing)
    parts = temp_sibling(existing, "parts", proc.pid)
    if workers > 1:
        busy = lambda: any(parts.glob("*.part"))  # noqa: E731
    else:
        busy = lambda: temp_sibling(existing, "tmp", proc.pid).exists()  # noqa: E731
    assert wait_for(lambda: busy() or proc.poll() is not None, 60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (143, 0)  # 143: SystemExit / the script's exit status for SIGTERM
    if proc.returncode == 143:
        assert sha(existing) == before
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left in (["p.h5"], ["p.h5", "p_overlays", "p_summary.json"]), left  # no temp file, no parts
    assert wait_for(lambda: not tagged_pids(tag), 10), f"orphan processes: {tagged_pids(tag)}"
