"""The real study (benchmarks/real_study): a cut-down run on the real data, and the skip without it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, require_shared

import fusion.encoders
from fusion.study import SharedDataMissing, load_study_config, run_study

CONFIG = ROOT / "benchmarks" / "real_study" / "config.yaml"


def test_study_config_overrides_parse_as_yaml():
    cfg = load_study_config(CONFIG, ["sweep.seeds=[0,1,2,3,4]", "sweep.image_size=360", "new.key=x"])
    assert cfg["sweep"]["seeds"] == [0, 1, 2, 3, 4] and cfg["sweep"]["image_size"] == 360
    assert cfg["new"]["key"] == "x" and cfg["prcc"]["image_size"] == 48
    with pytest.raises(ValueError, match="section.key=value"):
        load_study_config(CONFIG, ["sweep.seeds"])


def test_study_skips_with_a_message_without_the_real_data(tmp_path):
    cfg = load_study_config(CONFIG, [f"shared={tmp_path / 'absent'}"])
    with pytest.raises(SharedDataMissing, match="absent"):
        run_study(cfg)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_study/run.py"),
                          "--set", f"shared={tmp_path / 'absent'}"], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0 and "SKIP" in out.stdout and "absent" in out.stdout


def test_combine_reuses_only_runs_whose_budget_is_unchanged(tmp_path):
    """min_steps 400 -> 800: the recorded 50%/100% rows plan the same steps and are reused; 10% is not."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks" / "real_study"))
    from combine import combine

    old = [json.loads(line) for line in (ROOT / "benchmarks/real_study/results_min_steps_400.jsonl").open()]
    today_rows = [r for r in old if r["fraction"] == 0.5]  # unchanged budget, rerun: must compare identical
    today_rows += [{**r, "steps": 800, "macro_f1": r["macro_f1"] + 0.01} for r in old if r["fraction"] == 0.01]
    today_rows[0] = {**today_rows[0], "macro_f1": 0.5}  # one 50% run differs: reported as a mismatch
    today = tmp_path / "sweep"
    today.mkdir()
    (today / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in today_rows))
    (today / "config.yaml").write_text(yaml.safe_dump({"min_steps": 800, "max_steps": 1500, "epochs": 20,
                                                       "evals": 10, "batch_size": 64}))
    (tmp_path / "record").mkdir()
    s = combine(today, ROOT / "benchmarks/real_study/results_min_steps_400.jsonl", tmp_path / "out",
                tmp_path / "record")
    assert s["runs_today"] == 54 and s["runs_reused"] == 27 and all(n.startswith("f1.0_") for n in s["reused"])
    assert len(s["runs_left_out"]) == 27 and all(n.startswith("f0.1_") for n in s["runs_left_out"])
    assert s["compared_unchanged_budget"] == 27 and s["identical"] == 26
    assert list(s["mismatches"]) == [today_rows[0]["run"]]
    rows = [json.loads(line) for line in (tmp_path / "record" / "results.jsonl").open()]
    assert sorted({r["fraction"] for r in rows}) == [0.01, 0.5, 1.0]
    assert (tmp_path / "record" / "report.md").is_file()


@pytest.mark.slow
def test_cut_down_real_study_end_to_end(tmp_path, monkeypatch):
    """One seed, two fractions, two arms, short training: every stage on the real data, then a resume."""
    shared = require_shared("pbc-wbc").parent
    require_shared("cam16-patches")
    require_shared("wsi", "cmu-1-small-region.svs")
    sets = [f"shared={shared}", f"work={tmp_path / 'work'}", f"record={tmp_path / 'record'}",
            "prcc.epochs=1", "prcc.tiles_per_slide=10", "prcc.crops_per_image=2", "prcc.val_crops_per_image=2",
            "cam16.epochs=1", "pilot.modes=[concat]", "pilot.fractions=[0.1]",
            "sweep.fractions=[0.01,0.1]", "sweep.arms=[scratch,prcc+cam16]", "sweep.seeds=[0]",
            "sweep.min_steps=40", "sweep.max_steps=60", "sweep.evals=2", f"sweep.cache_dir={tmp_path / 'cache'}"]
    computed = []
    real_compute = fusion.encoders.compute_features

    def counting(encoders, *args, **kwargs):
        computed.extend(encoders)
        return real_compute(encoders, *args, **kwargs)

    monkeypatch.setattr(fusion.encoders, "compute_features", counting)
    record = run_study(load_study_config(CONFIG, sets))
    assert sorted(computed) == ["cam16", "prcc"]  # once for the pilot, then reused by the sweep

    rows = [json.loads(line) for line in (record / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run"] for r in rows) == sorted(
        f"f{f}_{a}_s0" for f in ("0.01", "0.1") for a in ("scratch", "prcc+cam16_sum", "prcc+cam16_concat"))
    assert all(r["status"] == "ok" for r in rows)
    assert {r["n_train"] for r in rows} == {59, 577}  # the committed split's fractions
    reused = [r["run"] for r in rows if r.get("val_run")]
    assert reused == ["f0.1_prcc+cam16_concat_s0"]  # the pilot's run: tested, not trained again
    scratch10 = next(r for r in rows if r["run"] == "f0.1_scratch_s0")
    assert scratch10["macro_f1"] > 0.5  # 60 steps on real cells already beat chance (0.2) by far
    pilot = json.loads((record / "pilot.json").read_text())
    assert pilot["chosen"] == "concat" and "macro_f1" not in json.dumps(pilot["runs"]).replace("val_macro_f1", "")
    for name in ("report.md", "results.csv", "per_class.csv", "paired.csv", "metric_vs_fraction.png",
                 "confusion_0.01_scratch.png", "sweep_config.yaml", "timings.json", "machine.json", "prcc_metrics.json",
                 "cam16_metrics.json"):
        assert (record / name).is_file(), name
    assert not (record / "config.yaml").exists()  # the sweep's config is recorded as sweep_config.yaml
    timings = json.loads((record / "timings.json").read_text())
    assert {"prcc_autoencoder", "cam16_resnet", "pilot", "sweep", "report"} <= set(timings)
    assert json.loads((record / "machine.json").read_text())["torch_cpu_capability"]  # which CPU kernels ran
    speed = json.loads((record / "speed.json").read_text())  # the machine's speed beside the wall time
    assert [p["at"] for p in speed] == ["start", "end"] and all(p["ms_per_step"] > 0 for p in speed)

    run_study(load_study_config(CONFIG, sets))  # resume: nothing is trained again
    again = json.loads((record / "timings.json").read_text())
    assert again["prcc_autoencoder"] == timings["prcc_autoencoder"] and again["pilot"] == timings["pilot"]
    assert len((record / "results.jsonl").read_text().splitlines()) == len(rows)
    assert [p["at"] for p in json.loads((record / "speed.json").read_text())] == ["start", "end", "start", "end"]


def test_results_tables_regenerate_from_the_committed_record():
    """tables.py rebuilds RESULTS.md's tables from the recorded files; they must agree with RESULTS.md."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_study/tables.py")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    results = (ROOT / "RESULTS.md").read_text()
    for section in ("Table", "Paired", "Per class", "Baseline", "Timings"):
        assert f"<!-- {section} -->" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1% | ") or line.startswith("| 100% | ")]
    assert len(rows) > 20 and all(row in results for row in rows)  # RESULTS.md shows the recorded numbers


def test_thread_effect_reports_run_differences_and_verdict_flips():
    """thread_effect.py compares two records run by run and lists paired intervals that change side of 0."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "real_study"))
    from thread_effect import _jsonl, _paired, compare

    rec = ROOT / "benchmarks" / "real_study"
    a, pa = _jsonl(rec / "results.jsonl"), _paired(rec / "paired.csv")
    b = {n: {**r, "torch_threads": 2} for n, r in a.items()}
    n0 = sorted(b)[0]
    b[n0] = {**b[n0], "macro_f1": b[n0]["macro_f1"] + 0.01, "confusion": [[0]]}
    pb = dict(pa)
    k = next(iter(pb))
    pb[k] = {**pb[k], "macro_f1_lo": "0.5", "macro_f1_hi": "0.6"}  # now "above 0"
    text = "\n".join(compare(a, b, pa, pb))
    assert f"{len(a) - 1} of them have identical" in text and "| 0.0100 |" in text
    assert f"{len(pa) - 1} fall on the same side" in text and "1 change side" in text
    with pytest.raises(ValueError, match="share no run"):
        compare(a, {n: {**r, "steps": -1} for n, r in b.items()}, pa, pb)


def test_one_go_check_finds_a_changed_run_and_compares_days_without_reused_rows():
    """one_go.py: a run that differs in any compared metric is named; reused rows stay out of the speed ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "real_study"))
    from one_go import _ok, compare, seconds_by_fraction

    rec = ROOT / "benchmarks" / "real_study"
    old = _ok(rec / "results.jsonl")
    new = _ok(rec / "one_go" / "results.jsonl")
    both, differ = compare(new, old)
    assert len(both) == 108 and differ == []  # the committed one-go run reproduces the record
    # ... and so does the one on an AVX-512 CPU with the AVX2 kernels forced (ONE_GO_3.md)
    assert compare(_ok(rec / "one_go_3" / "results.jsonl"), old) == (both, [])
    n0 = sorted(new)[0]
    changed = {**new, n0: {**new[n0], "per_class": {**new[n0]["per_class"], "x": 1.0}}}
    assert compare(changed, old)[1] == [n0]
    by_fraction = {f: n for f, n, _, _ in seconds_by_fraction(new, old)}
    assert by_fraction[1.0] == 9 and by_fraction[0.01] == 27  # 18 rows reused from another day left out


def test_study_checkpoints_name_the_missing_file_and_the_fix(tmp_path):
    from fusion.study import study_checkpoints

    (tmp_path / "prcc_autoencoder.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"cam16_resnet\.pt does not exist: run the study first"):
        study_checkpoints(tmp_path)
    (tmp_path / "cam16_resnet.pt").write_bytes(b"x")
    assert study_checkpoints(tmp_path) == {"prcc": tmp_path / "prcc_autoencoder.pt",
                                           "cam16": tmp_path / "cam16_resnet.pt"}


def test_machine_info_names_the_cpu_kernels_that_shape_the_numbers(monkeypatch):
    """The same config gives different numbers where torch's CPU kernels differ (CPU_EFFECT.md), so a record says which."""
    import torch

    from fusion.study import machine_info

    info = machine_info()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NEON", "SVE256"}
    assert {"cpu", "cpu_family", "cpu_model", "cpu_count", "torch_threads", "gpu", "torch"} <= set(info)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert machine_info()["torch_cpu_capability"] == "AVX2"
