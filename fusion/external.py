"""Cross-lab evaluation of a sweep: every finished run scored on each external labelled set.

    external: {bccd: ../shared/data/bccd-wbc}        # in a sweep config; any number of sets

After the runs (and again on every rerun, for runs not yet scored), each run's `best.pt` is evaluated
on each set exactly as `scripts/evaluate.py` does (classes matched by name, images of unknown classes
left out, macro-F1 over the classes the set holds), into `<run>/external_<name>/`, and one row per
(run, set) is appended to `<sweep>/external.jsonl`. A run is scored again only when its checkpoint
changed (sha256). The report shows a table per set (macro-F1 and balanced accuracy, mean ± CI over
seeds; per-class recall; the classes the set lacks) and the same paired differences as in-distribution.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.utils import append_jsonl, get_device, read_jsonl, sha256_file

from .data import load_wbc

KEEP = ("run", "arm", "sources", "twin_of", "backbone", "backbone_pretrained", "backbone_frozen", "mode",
        "fraction", "seed", "fold", "status")


def check_external(external: dict) -> dict[str, str]:
    """{name: folder}; ValueError for a bad name, FileNotFoundError for a missing folder (named)."""
    if not isinstance(external, dict):
        raise ValueError(f"external must map a name to a labelled folder, e.g. {{bccd: ../shared/data/bccd-wbc}}, "
                         f"got {external!r}")
    for name, path in external.items():
        if not str(name).replace("-", "_").isidentifier():
            raise ValueError(f"external set name {name!r} must be a plain word (it names run sub-folders)")
        if not Path(str(path)).exists():
            raise FileNotFoundError(f"external set {name!r}: {path} does not exist")
    return {str(k): str(v) for k, v in external.items()}


def evaluate_external(out: Path, external: dict[str, str], rows: list[dict], cache_dir: str | None = None,
                      device: str = "auto", batch_size: int = 128) -> Path:
    """Score every ok run of `rows` on every set of `external` not scored yet; return external.jsonl."""
    from .evaluate import load_classifier, score_data

    path = out / "external.jsonl"
    done = {(r["run"], r["external"]): r.get("checkpoint_sha256") for r in read_jsonl(path)}
    ok = [r for r in rows if r.get("status") == "ok" and (out / "runs" / r["run"] / "best.pt").is_file()]
    dev = get_device(device)
    loaded: dict[tuple[str, int, tuple], object] = {}
    for name, folder in external.items():
        for r in ok:
            ckpt = out / "runs" / r["run"] / "best.pt"
            sha = sha256_file(ckpt)
            if done.get((r["run"], name)) == sha:
                continue
            model, info = load_classifier(ckpt, dev)
            key = (folder, info["image_size"], tuple(info["preprocess"]))
            if key not in loaded:  # one decode per set, image size and preprocessing
                loaded[key] = load_wbc(folder, info["image_size"], cache_dir, progress=False,
                                       preprocess=info["preprocess"])
            data = loaded[key]
            m = score_data(model, info, data, dev, batch_size)["report"]
            res = {**{k: r[k] for k in KEEP if k in r}, "external": name, "data": data.root, "checkpoint_sha256": sha,
                   "n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                   "macro_f1": m["macro_f1"], "macro_f1_over": m["macro_f1_over"], "per_class": m["per_class"],
                   "confusion": m["confusion"]["matrix"], "classes": info["classes"],
                   "absent_classes": [c for c in info["classes"] if c not in m["macro_f1_over"]],
                   "predicted_as_absent": m["predicted_as_absent"]}
            folder_out = out / "runs" / r["run"] / f"external_{name}"
            folder_out.mkdir(exist_ok=True)
            (folder_out / "metrics.json").write_text(json.dumps(res, indent=1))
            append_jsonl(path, res)
            print(f"{r['run']} on {name}: macro-F1 {m['macro_f1']:.3f}, balanced accuracy "
                  f"{m['balanced_accuracy']:.3f}", flush=True)
    return path


def external_rows(out: Path) -> dict[str, list[dict]]:
    """{set name: rows (last per run)} of `<out>/external.jsonl`, shaped like results rows for `summarise`."""
    path = out / "external.jsonl"
    by: dict[str, dict[str, dict]] = {}
    for r in read_jsonl(path) if path.is_file() else []:
        by.setdefault(r["external"], {})[r["run"]] = r
    return {k: list(v.values()) for k, v in by.items()}
