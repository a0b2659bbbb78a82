"""Every command-line entry point, as plain `main(argv)` functions.

`python scripts/<name>.py ...` (from a checkout) and `wbc <name> ...` (the console script a
`pip install` gives) both run these through `pretrain.cli.cli`: one-line errors, `--debug` for the
traceback. Each docstring is the command's `--help` text. Every config field is a flag; `--config
FILE.yaml` sets many at once (precedence: defaults < YAML < flags).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from pretrain.config import parse_config


def pretrain_prcc(argv: list[str] | None = None) -> dict:
    """Pretrain the PRCC convolutional autoencoder on random crops of every image under --data.

        python scripts/pretrain_prcc.py --data DIR [--config FILE.yaml] [--image-size 64] [--epochs 30]
            [--batch-size 32] [--lr 1e-3] [--seed 0] [--device auto] [--out checkpoints/prcc_autoencoder.pt]

    Rerunning resumes a killed run (same weights as an uninterrupted one) or reuses a finished one;
    --out is replaced only by a better checkpoint (or with --overwrite true).
    """
    from pretrain.train_prcc import PRCCConfig, fit_prcc

    cfg, _ = parse_config(PRCCConfig, argv, description=pretrain_prcc.__doc__)
    metrics = fit_prcc(cfg)
    print(json.dumps(metrics))
    return metrics


def pretrain_cam16(argv: list[str] | None = None) -> dict:
    """Train the Camelyon16 ResNet tumor-vs-normal classifier on patches split by slide.

        python scripts/pretrain_cam16.py --data PATCHES [--arch resnet18] [--image-size 96] [--epochs 10]
            [--val-slides S ...] [--test-slides S ...] [--weights-path LOCAL.pth] [--out checkpoints/cam16_resnet.pt]

    PATCHES: our HDF5 patch store (.h5), a PatchCamelyon file or folder, or a folder with normal/ and
    tumor/ subfolders of `<slide>_<x>_<y>.png` patches. Resumes and publishes like pretrain_prcc.
    """
    from pretrain.train_cam16 import Cam16Config, fit_cam16

    cfg, _ = parse_config(Cam16Config, argv, description=pretrain_cam16.__doc__)
    metrics = fit_cam16(cfg)
    print(json.dumps(metrics["test"]))
    return metrics


def extract_patches(argv: list[str] | None = None) -> int:
    """Tile whole-slide images into one HDF5 patch store (labels from ASAP XML annotations).

        python scripts/extract_patches.py --slides SLIDES_OR_FOLDER ... --annotations XML_DIR
            --out patches.h5 --patch-size 256 --mpp 0.5 --workers 2

    Prints a per-slide summary; writes an overlay PNG per slide to <out>_overlays/. Exit status 1 when
    any slide failed: the others are still extracted into a new --out, but an existing --out is never
    replaced by a store with fewer slides (see pretrain/extract_job.py).
    """
    from pretrain.extract import ExtractConfig
    from pretrain.extract_job import run

    cfg, _ = parse_config(ExtractConfig, argv, description=extract_patches.__doc__)
    return run(cfg)


def make_demo_data(argv: list[str] | None = None) -> None:
    """Generate the synthetic demo data set (WBC JPEGs, PRCC PNGs, CAM16 pyramidal TIFFs + ASAP XML).

        python scripts/make_demo_data.py --out data/demo --seed 0 [--small] [--force]

    An existing set with the same seed and sizes is kept (--force regenerates); the set is built in a
    temporary folder and renamed at the end, so an interrupted run leaves no half set.
    """
    from pretrain.demo import DemoConfig
    from pretrain.demo import make_demo_data as make

    cfg, _ = parse_config(DemoConfig, argv, description=make_demo_data.__doc__)
    make(cfg)


def make_split(argv: list[str] | None = None) -> dict:
    """Make the one WBC train/val/test split with nested label fractions, saved as JSON.

        python scripts/make_split.py --data ../shared/data/pbc-wbc --out data/split.json --image-size 64
    """
    from .splits import SplitConfig, run_make_split

    cfg, _ = parse_config(SplitConfig, argv, description=make_split.__doc__)
    return run_make_split(cfg)


def train_fusion(argv: list[str] | None = None) -> dict:
    """Train one fusion run (one fraction, arm, mode and seed) into its own folder.

        python scripts/train_fusion.py --data DIR --arm prcc+cam16 --mode sum --fraction 0.1 --seed 0
            --out runs/one [--config FILE.yaml] [--overwrite true]
    """
    from .train import RunConfig, run

    cfg, _ = parse_config(RunConfig, argv, description=train_fusion.__doc__)
    return run(cfg)


def sweep(argv: list[str] | None = None) -> Path:
    """Run a fusion sweep: label fractions x arms x seeds (x fusion modes), one folder per run.

        python scripts/sweep.py --config configs/demo_sweep.yaml [--seeds 0 1 2] [--overwrite true]
            [--workers 2 --worker-threads 1 | --launcher ray [--ray-address auto] [--ray-gpus 0.25]]

    Rerunning the same command resumes: finished runs made with the same settings are reused; runs
    made with other settings are listed and the sweep stops (--rerun-changed true trains them again).
    --launcher ray trains each run as a Ray task (pip install '.[distributed]'; see fusion/launch.py).
    """
    from .sweep import SweepConfig, run_sweep

    cfg, _ = parse_config(SweepConfig, argv, description=sweep.__doc__)
    return run_sweep(cfg)


def report(argv: list[str] | None = None) -> Path:
    """Write the report of a sweep folder: report.md, results.csv, per_class.csv, paired.csv and PNGs.

        python scripts/report.py runs/demo_sweep

    Prints the headline table (macro-F1 and accuracy, mean ± 95% CI over seeds), one verdict per
    fraction, and the path of report.md.
    """
    from .report import ReportConfig, run_report

    cfg, ns = parse_config(ReportConfig, argv, description=report.__doc__,
                           extra=lambda p: p.add_argument("sweep_dir", nargs="?", default=None,
                                                          help="sweep folder (same as --run-dir)"))
    if ns.sweep_dir:
        cfg.run_dir = ns.sweep_dir
    return run_report(cfg)


def extract_features(argv: list[str] | None = None) -> None:
    """Encode a folder of images with a trained encoder checkpoint and write the features to HDF5.

        python scripts/extract_features.py --checkpoint checkpoints/prcc_autoencoder.pt --images DIR --out f.h5
    """
    from .features import FeatureConfig, run_extract_features

    cfg, _ = parse_config(FeatureConfig, argv, description=extract_features.__doc__)
    run_extract_features(cfg)


def study(argv: list[str] | None = None) -> int:
    """The whole study, resumable: PRCC autoencoder -> CAM16 ResNet -> pilot -> sweep -> report.

        python scripts/study.py --config benchmarks/real_study/config.yaml [--set sweep.seeds=[0,1,2,3,4]]

    Prints SKIP and exits 0 when the real data folder named by the config is absent.
    """
    import argparse

    from .study import SharedDataMissing, load_study_config, run_study

    p = argparse.ArgumentParser(description=study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML (sections prcc, cam16, pilot, sweep)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML), e.g. --set sweep.seeds=[0,1,2,3,4]")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    try:
        run_study(load_study_config(args.config, args.set))
    except SharedDataMissing as e:
        print(f"SKIP: {e}")
    return 0


def evaluate(argv: list[str] | None = None) -> dict:
    """Score a trained model on a labelled folder of class folders (another lab's images, a test set).

        python scripts/evaluate.py --checkpoint runs/one/best.pt --data ../shared/data/bccd-wbc
            [--out DIR] [--device auto] [--batch-size 128]

    Writes metrics.json, predictions.csv and confusion.png into --out (default:
    <checkpoint folder>/eval_<data folder name>/) and prints a per-class table. Class folders are matched
    to the model's classes by name, case-insensitively; images of classes the model does not know are
    counted and left out, and macro-F1 averages over the classes present in the data.
    """
    from .evaluate import EvalConfig, run_evaluate

    cfg, _ = parse_config(EvalConfig, argv, description=evaluate.__doc__)
    return run_evaluate(cfg)


def predict(argv: list[str] | None = None) -> Path:
    """Class probabilities of a trained model for unlabelled images (every image under a folder).

        python scripts/predict.py --checkpoint runs/one/best.pt --images DIR --out preds.csv

    Images are decoded as in training, at the checkpoint's image size; unreadable ones are skipped with
    a warning naming each. The CSV has one row per image: file, predicted_class, p_<class> per class.
    """
    from .evaluate import PredictConfig, predict_images

    cfg, _ = parse_config(PredictConfig, argv, description=predict.__doc__)
    return predict_images(cfg)


def eda(argv: list[str] | None = None) -> Path:
    """Exploratory report of a WBC data set: one markdown page with class counts, montages, mean images,
    colour histograms, original image sizes, duplicate groups, and PCA / t-SNE of raw pixels and of each
    frozen source's features (sources from --prcc-checkpoint / --cam16-checkpoint or `sources:` in YAML).

        python scripts/eda.py --data ../shared/data/pbc-wbc --out runs/eda_pbc [--config FILE.yaml]
    """
    from .eda import EDAConfig, run_eda

    cfg, _ = parse_config(EDAConfig, argv, description=eda.__doc__)
    path = run_eda(cfg)
    print(f"wrote {path}")
    return path


def lr_find(argv: list[str] | None = None) -> dict:
    """Learning-rate range test of one run's recipe on its training images (validation and test unused).

        python scripts/lr_find.py --config configs/demo_sweep.yaml [--lr-start 1e-6] [--lr-end 1] --out runs/lr_find

    Writes lr_find.csv, lr_find.json (the suggested rate) and lr_find.png into --out.
    """
    from .search import LRFindConfig, run_lr_find

    cfg, _ = parse_config(LRFindConfig, argv, description=lr_find.__doc__)
    return run_lr_find(cfg)


def search(argv: list[str] | None = None) -> dict:
    """Optuna search (TPE, median pruning) of a sweep's recipe on its VALIDATION split only.

        python scripts/search.py --sweep configs/demo_sweep.yaml --trials 20 --out runs/search [--config S.yaml]

    Each trial is a validation-only run at --fraction/--arm/--seed; the space (YAML `space:`) defaults to
    learning rate, weight decay, dropout and augmentation strength. Rerunning resumes. The best trial is
    written as <out>/best_sweep.yaml, a sweep config: python scripts/sweep.py --config <out>/best_sweep.yaml
    """
    from .search import SearchConfig, print_search, run_search

    cfg, _ = parse_config(SearchConfig, argv, description=search.__doc__)
    return print_search(run_search(cfg))


def ensemble(argv: list[str] | None = None) -> dict:
    """Average the test probabilities of finished runs (seeds of one arm, or different architectures).

        python scripts/ensemble.py --runs runs/architectures/runs/f1.0_*_s0 [--out DIR]

    The runs must have been tested on the same images. Prints and writes (to --out/ensemble.json) the
    ensemble's accuracy and macro-F1 beside each member's.
    """
    from .ensemble import EnsembleConfig, run_ensemble

    cfg, _ = parse_config(EnsembleConfig, argv, description=ensemble.__doc__)
    return run_ensemble(cfg)


def adapt(argv: list[str] | None = None) -> Path:
    """Few-shot adaptation to another lab: fine-tune a trained model on k labelled cells per class of the
    target set, test on the rest, against a model trained on those k cells alone.

        python scripts/adapt.py --checkpoint RUN/best.pt --data ../shared/data/bccd-wbc --shots 1 3 5 10
            --seeds 0 1 2 --out runs/adapt_bccd

    Writes adapt.jsonl (resumable), fewshot.md and fewshot.png into --out.
    """
    from .adapt import AdaptConfig, run_adapt

    cfg, _ = parse_config(AdaptConfig, argv, description=adapt.__doc__)
    return run_adapt(cfg)


COMMANDS: dict[str, Callable] = {f.__name__: f for f in (
    pretrain_prcc, pretrain_cam16, extract_patches, make_demo_data, make_split, train_fusion, sweep, report,
    extract_features, evaluate, predict, eda, study, lr_find, search, ensemble, adapt)}


def console() -> None:
    """`wbc <command> [args]`: the console script installed by `pip install`."""
    from pretrain.cli import cli

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"usage: wbc <command> [--help | args]; commands: {names}", file=sys.stderr)
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    sys.exit(cli(COMMANDS[sys.argv[1]], sys.argv[2:]))
