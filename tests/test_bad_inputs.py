"""Bad input to every script: a non-zero exit, one line naming the bad thing, and no traceback.

Each case runs a real script's `main` through `pretrain.cli.cli` (what `python scripts/x.py` does) in
this process, so the suite stays fast; `test_entry_points_*` runs a few as real subprocesses too.
A case may also check that nothing was lost (e.g. an existing store or checkpoint is unchanged).
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fusion_fakes import tiny_checkpoints, write_wbc_folder
from PIL import Image

from pretrain.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tuple(sorted(p.stem for p in (ROOT / "scripts").glob("*.py")))
BAD_SLIDES = ROOT.parent / "shared" / "data" / "wsi" / "bad"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Small real inputs shared by the cases: a WBC folder, tiny encoders, PRCC images, a patch store."""
    from pretrain.demo import generate_demo_data

    root = tmp_path_factory.mktemp("bad_inputs")
    demo = generate_demo_data(root / "demo", seed=0, small=True)
    ck = tiny_checkpoints(root / "ck")
    wbc = write_wbc_folder(root / "wbc", 8, 16)
    store = root / "good.h5"
    from pretrain.config import parse_config
    from pretrain.extract import ExtractConfig
    from pretrain.extract_job import run

    cfg, _ = parse_config(ExtractConfig, ["--slides", str(demo["slides"]), "--annotations", str(demo["annotations"]),
                                          "--out", str(store), "--patch-size", "32", "--mpp", "2.0",
                                          "--overlays", "false"])
    assert run(cfg) == 0
    return {"root": root, "demo": demo, "ck": ck, "wbc": wbc, "store": store}


def _yaml(tmp: Path, text: str) -> str:
    p = tmp / "cfg.yaml"
    p.write_text(text)
    return str(p)


def _wbc_args(fx, tmp) -> list[str]:
    return ["--data", str(fx["wbc"]), "--cache-dir", "", "--image-size", "16", "--model.cnn-channels", "8",
            "--optim.epochs", "1", "--optim.min-steps", "2", "--optim.evals", "1", "--val", "0.25", "--test", "0.25",
            "--runtime.progress", "false", "--runtime.curves", "false", "--runtime.device", "cpu",
            "--prcc-checkpoint", str(fx["ck"]["prcc"]), "--cam16-checkpoint", str(fx["ck"]["prcc"])]


def _sweep_args(fx, tmp) -> list[str]:
    return [*_wbc_args(fx, tmp), "--arms", "scratch", "--fractions", "1.0", "--seeds", "0",
            "--out", str(tmp / "sweep")]


def _arch_args(fx, tmp) -> list[str]:
    """A sweep's flags without --arms (the case's YAML defines the arms)."""
    args = _sweep_args(fx, tmp)
    i = args.index("--arms")
    return args[:i] + args[i + 2:]


def _finished_sweep(fx, tmp) -> list[str]:
    args = _sweep_args(fx, tmp)
    assert cli(_script("sweep").main, args) == 0
    return args


def _images(folder: Path, n: int = 3, size: int = 16, corrupt: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"im{i}.png"
        if corrupt:
            p.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            Image.fromarray(np.full((size, size, 3), 100 + i, np.uint8)).save(p)
    return folder


def _evil_pickle(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "wbc-fusion-checkpoint", "x": Evil()}, path)
    return path


@dataclass
class Case:
    script: str
    args: Callable[[dict, Path], list[str]]  # (fixtures, tmp_path) -> argv
    names: Callable[[dict, Path], str] | str  # what the message must name
    code: int = 1
    keep: Callable[[dict, Path], list[Path]] | None = None  # files that must be unchanged afterwards


def _copy_store(fx, tmp) -> Path:
    p = tmp / "existing.h5"
    p.write_bytes(fx["store"].read_bytes())
    return p


def _good_ckpt(fx, tmp) -> Path:
    p = tmp / "good_prcc.pt"
    if not p.exists():
        p.write_bytes(Path(fx["ck"]["prcc"]).read_bytes())
    return p


CASES = {
    # --- configs: types and keys (defect 2) -------------------------------------------------------
    "sweep-yaml-overwrite-quoted-false": Case("sweep", lambda f, t: [
        *_finished_sweep(f, t), "--config", _yaml(t, 'overwrite: "false"\n')], "overwrite",
        keep=lambda f, t: [t / "sweep" / "results.jsonl"]),
    "sweep-yaml-augment-quoted-false": Case("sweep", lambda f, t: ["--config", _yaml(t, 'augment:\n  enabled: "false"\n')],
                                            "augment"),
    "sweep-yaml-epochs-float": Case("sweep", lambda f, t: ["--config", _yaml(t, "optim:\n  epochs: 2.7\n")], "optim.epochs"),
    "sweep-yaml-epochs-word": Case("sweep", lambda f, t: ["--config", _yaml(t, "optim:\n  epochs: ten\n")], "optim.epochs"),
    "sweep-yaml-arms-scalar": Case("sweep", lambda f, t: ["--config", _yaml(t, "arms: scratch\n")], "arms"),
    "sweep-yaml-seeds-string-item": Case("sweep", lambda f, t: ["--config", _yaml(t, "seeds: [0, one]\n")],
                                         "seeds[1]"),
    "sweep-yaml-unknown-key": Case("sweep", lambda f, t: ["--config", _yaml(t, "epoch: 3\n")], "epoch"),
    "sweep-yaml-not-mapping": Case("sweep", lambda f, t: ["--config", _yaml(t, "- 1\n- 2\n")], "cfg.yaml"),
    "sweep-yaml-syntax": Case("sweep", lambda f, t: ["--config", _yaml(t, "epochs: [1, 2\n")], "cfg.yaml"),
    "sweep-config-missing": Case("sweep", lambda f, t: ["--config", str(t / "nope.yaml")], "nope.yaml"),
    "sweep-flag-epochs-word": Case("sweep", lambda f, t: ["--optim.epochs", "ten"], "--optim.epochs", code=2),
    "sweep-flag-bool-word": Case("sweep", lambda f, t: ["--augment.enabled", "maybe"], "--augment.enabled", code=2),
    "sweep-flag-unknown": Case("sweep", lambda f, t: ["--epoch", "3"], "--epoch", code=2),
    "sweep-unknown-arm": Case("sweep", lambda f, t: ["--arms", "imagenet"], "imagenet"),
    "sweep-unknown-mode": Case("sweep", lambda f, t: ["--modes", "attention"], "attention"),
    "sweep-fraction-above-1": Case("sweep", lambda f, t: ["--fractions", "1.5"], "1.5"),
    "sweep-workers-0": Case("sweep", lambda f, t: ["--workers", "0"], "workers"),
    "sweep-folds-beyond-smallest-class": Case("sweep", lambda f, t: [*_sweep_args(f, t), "--folds", "50"],
                                              "use folds <="),
    "sweep-missing-checkpoint": Case("sweep", lambda f, t: [
        *_sweep_args(f, t), "--arms", "cam16", "--cam16-checkpoint", str(t / "none.pt")], "none.pt"),
    "sweep-missing-data": Case("sweep", lambda f, t: [*_sweep_args(f, t), "--data", str(t / "nodata")], "nodata"),
    # --- resume (defect 4) -------------------------------------------------------------------------
    "sweep-resume-other-lr": Case("sweep", lambda f, t: [*_finished_sweep(f, t), "--optim.lr", "0.01"], "optim.lr: 0.002 -> 0.01",
                                  keep=lambda f, t: [t / "sweep" / "config.yaml", t / "sweep" / "results.jsonl"]),
    "sweep-resume-other-image-size": Case("sweep", lambda f, t: [*_finished_sweep(f, t), "--image-size", "24"],
                                          "image_size: 16 -> 24"),
    "sweep-locked": Case("sweep", lambda f, t: _locked(t / "sweep", _sweep_args(f, t)), "in use by another process"),
    # --- train_fusion ------------------------------------------------------------------------------
    "train-unknown-arm": Case("train_fusion", lambda f, t: ["--arm", "imagenet"], "imagenet"),
    "train-fraction-0": Case("train_fusion", lambda f, t: ["--fraction", "0"], "fraction"),
    "train-warmup-1.5": Case("train_fusion", lambda f, t: ["--optim.warmup", "1.5"], "optim.warmup"),
    "train-encoder-features": Case("train_fusion", lambda f, t: ["--model.encoder-features", "cached"], "cached"),
    "train-image-size-0": Case("train_fusion", lambda f, t: ["--image-size", "0"], "image_size"),
    "train-device-cuda": Case("train_fusion", lambda f, t: [*_wbc_args(f, t), "--runtime.device", "cuda:3",
                                                            "--out", str(t / "r")], "cuda:3"),
    "train-empty-data": Case("train_fusion", lambda f, t: [*_wbc_args(f, t), "--data", str(_mk(t / "empty")),
                                                           "--out", str(t / "r")], "empty"),
    "train-bad-npz": Case("train_fusion", lambda f, t: [*_wbc_args(f, t), "--data", str(_garbage(t / "bloodmnist.npz")),
                                                        "--out", str(t / "r")], "bloodmnist.npz"),
    "train-corrupt-split": Case("train_fusion", lambda f, t: [*_wbc_args(f, t), "--split", str(_garbage(t / "s.json")),
                                                              "--out", str(t / "r")], "s.json"),
    "train-split-of-other-images": Case("train_fusion", lambda f, t: [
        *_wbc_args(f, t), "--split", str(_other_split(f, t)), "--out", str(t / "r")], "other_split.json"),
    "train-resume-other-settings": Case("train_fusion", lambda f, t: _finished_run(f, t, "--model.dropout", "0.5"),
                                        "model.dropout: 0.2 -> 0.5"),
    # --- make_split ---------------------------------------------------------------------------------
    "split-missing-data": Case("make_split", lambda f, t: ["--data", str(t / "nowhere"), "--out", str(t / "s.json")],
                               "nowhere"),
    "split-shares-too-big": Case("make_split", lambda f, t: ["--data", str(f["wbc"]), "--val", "0.6", "--test", "0.6",
                                                             "--cache-dir", "", "--out", str(t / "s.json")], "val + test"),
    "split-fraction-0": Case("make_split", lambda f, t: ["--data", str(f["wbc"]), "--fractions", "0",
                                                         "--cache-dir", "", "--out", str(t / "s.json")], "0"),
    "split-out-under-a-file": Case("make_split", lambda f, t: [
        "--data", str(f["wbc"]), "--cache-dir", "", "--image-size", "16", "--out", str(_garbage(t / "f") / "s.json")],
        "f"),
    # --- report -------------------------------------------------------------------------------------
    "report-missing-folder": Case("report", lambda f, t: [str(t / "nosweep")], "nosweep"),
    "report-empty-results": Case("report", lambda f, t: [str(_results(t, ""))], "results.jsonl"),
    "report-garbage-results": Case("report", lambda f, t: [str(_results(t, "not json\n{torn"))], "results.jsonl"),
    # --- checkpoints (extract_features) --------------------------------------------------------------
    "features-missing-checkpoint": Case("extract_features", lambda f, t: [
        "--checkpoint", str(t / "no.pt"), "--images", str(f["wbc"]), "--out", str(t / "f.h5")], "no.pt"),
    "features-zero-byte-checkpoint": Case("extract_features", lambda f, t: [
        "--checkpoint", str(_touch(t / "zero.pt")), "--images", str(f["wbc"]), "--out", str(t / "f.h5")], "zero.pt"),
    "features-text-checkpoint": Case("extract_features", lambda f, t: [
        "--checkpoint", str(_garbage(t / "text.pt")), "--images", str(f["wbc"]), "--out", str(t / "f.h5")], "text.pt"),
    "features-pickle-refused": Case("extract_features", lambda f, t: [
        "--checkpoint", str(_evil_pickle(t / "evil.pt")), "--images", str(f["wbc"]), "--out", str(t / "f.h5")],
        "weights_only"),
    "features-missing-images": Case("extract_features", lambda f, t: [
        "--checkpoint", str(f["ck"]["prcc"]), "--images", str(t / "noimg"), "--out", str(t / "f.h5")], "noimg"),
    # --- evaluate / predict a trained model -----------------------------------------------------------
    "evaluate-wrong-kind": Case("evaluate", lambda f, t: ["--checkpoint", str(f["ck"]["prcc"]), "--data", str(f["wbc"]),
                                                          "--device", "cpu"], "'prcc_autoencoder' checkpoint"),
    "predict-wrong-kind": Case("predict", lambda f, t: ["--checkpoint", str(f["ck"]["prcc"]), "--images", str(f["wbc"]),
                                                        "--device", "cpu"], "prcc.pt"),
    # --- PRCC pretraining -----------------------------------------------------------------------------
    "prcc-missing-data": Case("pretrain_prcc", lambda f, t: _prcc(f, t, "--data", str(t / "nodir")), "nodir"),
    "prcc-empty-folder": Case("pretrain_prcc", lambda f, t: _prcc(f, t, "--data", str(_mk(t / "void"))), "void"),
    "prcc-corrupt-images": Case("pretrain_prcc", lambda f, t: _prcc(
        f, t, "--data", str(_images(t / "bad_png", corrupt=True))), "bad_png"),
    "prcc-images-below-crop": Case("pretrain_prcc", lambda f, t: _prcc(
        f, t, "--data", str(_images(t / "tiny", size=8)), "--image-size", "16"), "16 px"),
    "prcc-image-size-0": Case("pretrain_prcc", lambda f, t: _prcc(f, t, "--image-size", "0"), "image_size"),
    "prcc-val-fraction": Case("pretrain_prcc", lambda f, t: _prcc(f, t, "--val-fraction", "1.5"), "val_fraction"),
    "prcc-negative-lr": Case("pretrain_prcc", lambda f, t: _prcc(f, t, "--lr", "-1"), "lr"),
    "prcc-broken-slide": Case("pretrain_prcc", lambda f, t: _prcc(
        f, t, "--data", "", "--slides", str(BAD_SLIDES / "broken.svs")), "broken.svs"),
    # --- CAM16 pretraining ----------------------------------------------------------------------------
    "cam16-missing-data": Case("pretrain_cam16", lambda f, t: _cam16(f, t, "--data", str(t / "no.h5")), "no.h5"),
    "cam16-unknown-arch": Case("pretrain_cam16", lambda f, t: _cam16(f, t, "--arch", "resnet999"), "resnet999"),
    "cam16-not-a-patch-store": Case("pretrain_cam16", lambda f, t: _cam16(f, t, "--data", str(_h5(t / "other.h5"))),
                                    "other.h5"),
    "cam16-missing-weights": Case("pretrain_cam16", lambda f, t: _cam16(
        f, t, "--weights-path", str(t / "w.pth")), "w.pth"),
    "cam16-monitor": Case("pretrain_cam16", lambda f, t: _cam16(f, t, "--monitor", "val_f1"), "val_f1"),
    "cam16-image-size-16": Case("pretrain_cam16", lambda f, t: _cam16(f, t, "--image-size", "16"), "image_size"),
    # --- patch extraction (defect 1) -------------------------------------------------------------------
    "extract-broken-slide-keeps-store": Case("extract_patches", lambda f, t: [
        "--slides", str(BAD_SLIDES / "broken.svs"), "--out", str(_copy_store(f, t)), "--patch-size", "32",
        "--overlays", "false"], "broken.svs", keep=lambda f, t: [t / "existing.h5"]),
    "extract-unopenable-keeps-store": Case("extract_patches", lambda f, t: [
        "--slides", str(BAD_SLIDES / "unopenable.tiff"), "--out", str(_copy_store(f, t)), "--overlays", "false"],
        "unopenable.tiff", keep=lambda f, t: [t / "existing.h5"]),
    "extract-mpp-0": Case("extract_patches", lambda f, t: [
        "--slides", str(f["demo"]["slides"]), "--out", str(_copy_store(f, t)), "--mpp", "0"], "mpp",
        keep=lambda f, t: [t / "existing.h5"]),
    "extract-level-99": Case("extract_patches", lambda f, t: [
        "--slides", str(f["demo"]["slides"]), "--out", str(_copy_store(f, t)), "--level", "99", "--overlays", "false"],
        "99", keep=lambda f, t: [t / "existing.h5"]),
    "extract-missing-slides": Case("extract_patches", lambda f, t: [
        "--slides", str(t / "noslides"), "--out", str(t / "p.h5")], "noslides"),
    "extract-out-under-a-file": Case("extract_patches", lambda f, t: [
        "--slides", str(f["demo"]["slides"]), "--out", str(_garbage(t / "file") / "p.h5"), "--overlays", "false"],
        "file"),
    "extract-two-scales": Case("extract_patches", lambda f, t: [
        "--slides", str(f["demo"]["slides"]), "--mpp", "1", "--level", "0", "--out", str(t / "p.h5")], "--level"),
    # --- demo data ------------------------------------------------------------------------------------
    "demo-out-under-a-file": Case("make_demo_data", lambda f, t: ["--out", str(_garbage(t / "file") / "demo"),
                                                                  "--small", "true"], "file"),
    "demo-yaml-small-quoted": Case("make_demo_data", lambda f, t: ["--config", _yaml(t, 'small: "yes"\n')], "small"),
    "eda-missing-data": Case("eda", lambda f, t: ["--data", str(t / "nocells"), "--out", str(t / "eda")], "nocells"),
    "eda-perplexity-0": Case("eda", lambda f, t: ["--data", str(f["wbc"]), "--perplexity", "0"], "perplexity"),
    # --- the whole study -------------------------------------------------------------------------------
    "study-config-missing": Case("study", lambda f, t: ["--config", str(t / "nostudy.yaml")], "nostudy.yaml"),
    "study-without-record": Case("study", lambda f, t: ["--config", _yaml(t, f"shared: {t}\nwork: {t / 'w'}\n")],
                                 "record:"),
    # --- architectures, search, ensembles (issue 18) -------------------------------------------------
    "sweep-unknown-architecture": Case("sweep", lambda f, t: [*_arch_args(f, t), "--config", _yaml(
        t, "arms: {scratch: [], x: {backbone: resnet81}}\n")], "unknown architecture 'resnet81'"),
    "sweep-architecture-weights-of-another": Case("sweep", lambda f, t: [*_arch_args(f, t), "--image-size", "32", "--config", _yaml(
        t, f"arms: {{r18: {{backbone: resnet18, weights: {_squeezenet(t)}}}}}\n")], "does not fit torchvision:resnet18"),
    "sweep-image-too-small-for-architecture": Case("sweep", lambda f, t: [*_arch_args(f, t), "--config", _yaml(
        t, "arms: {a: {backbone: alexnet}}\n")], "needs images of at least 63x63 pixels"),
    "search-no-sweep": Case("search", lambda f, t: ["--out", str(t / "s")], "--sweep FILE.yaml is required"),
    "search-space-empty": Case("search", lambda f, t: ["--sweep", str(t / "x.yaml"), "--config", _yaml(t, "space: {}\n")],
                               "search space is empty"),
    "search-space-inverted": Case("search", lambda f, t: ["--sweep", str(t / "x.yaml"), "--config", _yaml(
        t, "space: {optim.lr: [0.01, 0.0001]}\n")], "optim.lr: low 0.01 >= high 0.0001"),
    "search-sweep-missing": Case("search", lambda f, t: ["--sweep", str(t / "nosweep.yaml")], "nosweep.yaml"),
    "lr-find-inverted-range": Case("lr_find", lambda f, t: [*_wbc_args(f, t), "--lr-start", "1", "--lr-end", "0.1"],
                                   "lr_start 1.0 and lr_end 0.1"),
    "ensemble-one-run": Case("ensemble", lambda f, t: ["--runs", str(t)], "at least 2 runs"),
    "ensemble-untested-run": Case("ensemble", lambda f, t: ["--runs", str(_mk(t / "a")), str(_mk(t / "b"))],
                                  "test_probs.npz does not exist"),
    "ensemble-no-match": Case("ensemble", lambda f, t: ["--runs", str(t / "nothing*")], "nothing*"),

    # --- cross-lab (issue 19) ------------------------------------------------------------------------
    "adapt-no-data": Case("adapt", lambda f, t: ["--checkpoint", str(f["ck"]["prcc"])], "--checkpoint and --data are required"),
    "adapt-shots-0": Case("adapt", lambda f, t: ["--checkpoint", "x.pt", "--data", "d", "--shots", "0"], "shots must list"),
    "adapt-encoder-checkpoint": Case("adapt", lambda f, t: ["--checkpoint", str(f["ck"]["prcc"]), "--data", str(f["wbc"])],
                                     "not a trained WBC classifier"),
    "sweep-external-missing": Case("sweep", lambda f, t: [*_sweep_args(f, t), "--config", _yaml(
        t, f"external: {{lab2: {t / 'nolab'}}}\n")], "external set 'lab2'"),
}


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _garbage(p: Path) -> Path:
    p.write_text("this is not what you think it is\n")
    return p


def _h5(p: Path) -> Path:
    import h5py

    with h5py.File(p, "w") as h:
        h["something"] = np.zeros(3)
    return p


def _results(t: Path, text: str) -> Path:
    d = _mk(t / "sw")
    (d / "results.jsonl").write_text(text)
    return d


def _locked(folder: Path, args: list[str]) -> list[str]:
    """Hold the sweep folder's lock from a child process while the case runs."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.utils import folder_lock\n"
            "with folder_lock(sys.argv[2], '.sweep.lock'):\n    print('locked', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    _HOLDERS.append(p)
    return args


_HOLDERS: list[subprocess.Popen] = []


def _other_split(fx, t: Path) -> Path:
    from fusion.data import load_wbc
    from fusion.splits import make_split, save_split

    other = write_wbc_folder(t / "other_wbc", 8, 16, seed=5)
    split = make_split(load_wbc(other, 16, None, progress=False), val=0.25, test=0.25, fractions=(1.0,))
    return save_split(split, t / "other_split.json")


def _squeezenet(t: Path) -> Path:
    from pretrain.backbones import build_backbone

    torch.save(build_backbone("torchvision:squeezenet1_1").state_dict(), t / "sq.pth")
    return t / "sq.pth"


def _finished_run(fx, t: Path, *change: str) -> list[str]:
    args = [*_wbc_args(fx, t), "--out", str(t / "run")]
    assert cli(_script("train_fusion").main, args) == 0
    return [*args, *change]


def _prcc(fx, t: Path, *extra: str) -> list[str]:
    return ["--data", str(fx["demo"]["prcc"]), "--image-size", "16", "--epochs", "1", "--progress", "false",
            "--out", str(t / "prcc.pt"), "--run-dir", str(t / "prcc_run"), "--device", "cpu", *extra]


def _cam16(fx, t: Path, *extra: str) -> list[str]:
    return ["--data", str(fx["store"]), "--image-size", "32", "--epochs", "1", "--progress", "false",
            "--out", str(t / "cam16.pt"), "--run-dir", str(t / "cam16_run"), "--device", "cpu", *extra]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_with_one_line_naming_it(name, fx, tmp_path, capsys):
    case = CASES[name]
    if ("broken" in name or "unopenable" in name) and not BAD_SLIDES.is_dir():
        pytest.skip(f"real broken slides not found at {BAD_SLIDES}")
    try:
        argv = case.args(fx, tmp_path)
        keep = {p: _sha(p) for p in (case.keep(fx, tmp_path) if case.keep else [])}
        capsys.readouterr()
        try:
            code = cli(_script(case.script).main, argv)
        except SystemExit as e:  # argparse: exit 2 after its one line
            code = e.code
    finally:
        for p in _HOLDERS:
            p.kill()
            p.wait()
        _HOLDERS.clear()
    err = capsys.readouterr().err
    what = case.names(fx, tmp_path) if callable(case.names) else case.names
    assert code == case.code, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert what in lines[0], f"{what!r} not in {lines[0]!r}"
    for p, digest in keep.items():
        assert p.is_file() and _sha(p) == digest, f"{p} was changed or removed"


def test_the_suite_covers_every_script_and_at_least_fifty_cases():
    assert len(CASES) >= 50
    assert {c.script for c in CASES.values()} == set(SCRIPTS)


@pytest.mark.parametrize("argv,names", [
    (["scripts/sweep.py", "--optim.epochs", "2.7"], "--optim.epochs"),
    (["scripts/report.py", "/nonexistent/sweep"], "/nonexistent/sweep"),
    (["scripts/pretrain_cam16.py", "--arch", "resnet999"], "resnet999"),
])
def test_entry_points_print_one_line_without_traceback(argv, names):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr and names in out.stderr, out.stderr


def test_debug_shows_the_traceback():
    out = subprocess.run([sys.executable, "scripts/report.py", "/nonexistent/sweep", "--debug"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" in out.stderr and "/nonexistent/sweep" in out.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def main(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli(main, [])


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from pretrain.cli import cli\n"
            "def main(argv):\n"
            "    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    finally:\n        open(sys.argv[2], 'w').write('cleaned')\n"
            "sys.exit(cli(main, []))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "c")], capture_output=True, text=True)
    assert out.returncode == 143 and (tmp_path / "c").read_text() == "cleaned"
    assert "Traceback" not in out.stderr and "run the same command again" in out.stderr


def test_malicious_pickle_never_runs(tmp_path, capsys):
    p = _evil_pickle(tmp_path / "evil.pt")
    from pretrain.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    assert "pwned" not in capsys.readouterr().out
