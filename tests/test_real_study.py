"""The real study (benchmarks/real_study): a cut-down run on the real data, and the skip without it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, require_shared

import fusion.encoders
from fusion.study import SharedDataMissing, load_study_config, run_study

RECORD = ROOT / "benchmarks" / "real_study"
CONFIG = RECORD / "config.yaml"


def test_study_config_overrides_parse_as_yaml():
    cfg = load_study_config(CONFIG, ["sweep.seeds=[0,1,2,3,4]", "sweep.image_size=360", "sweep.optim.lr=0.001"])
    assert cfg["sweep"]["seeds"] == [0, 1, 2, 3, 4] and cfg["sweep"]["image_size"] == 360
    assert cfg["sweep"]["optim"] == {"lr": 0.001} and cfg["prcc"]["image_size"] == 48
    with pytest.raises(ValueError, match="section.key=value"):
        load_study_config(CONFIG, ["sweep.seeds"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['new'\]"):
        load_study_config(CONFIG, ["new.key=x"])


def test_study_skips_with_a_message_without_the_real_data(tmp_path):
    cfg = load_study_config(CONFIG, [f"shared={tmp_path / 'absent'}"])
    with pytest.raises(SharedDataMissing, match="absent"):
        run_study(cfg)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_study/run.py"),
                          "--set", f"shared={tmp_path / 'absent'}"], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0 and "SKIP" in out.stdout and "absent" in out.stdout


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
            "sweep.optim.min_steps=40", "sweep.optim.max_steps=60", "sweep.optim.evals=2", f"sweep.cache_dir={tmp_path / 'cache'}"]
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


def test_results_table_is_the_committed_record():
    """RESULTS.md's macro-F1 table is what fusion.report computes from the recorded results.jsonl."""
    from fusion.report import _table, load_results, summarise

    rows = _table(summarise(load_results(RECORD)), "macro_f1")
    results = (ROOT / "RESULTS.md").read_text()
    assert len(rows) == 6 and all(row in results for row in rows)  # header, rule, 1%, 10%, 50%, 100%


def test_the_one_go_replicate_on_avx2_kernels_is_the_record_run_by_run():
    """one_go_3/ (the whole study again, AVX2 kernels forced on an AVX-512 CPU) equals results.jsonl."""
    keys = ("accuracy", "macro_f1", "val_macro_f1", "per_class", "confusion", "steps", "batch_size", "best_epoch")

    def runs(path):
        return {r["run"]: tuple(json.dumps(r.get(k), sort_keys=True) for k in keys)
                for r in map(json.loads, path.read_text().splitlines()) if r["status"] == "ok"}

    record, replicate = runs(RECORD / "results.jsonl"), runs(RECORD / "one_go_3" / "results.jsonl")
    assert len(record) == 108 and replicate == record


def test_study_checkpoints_name_the_missing_file_and_the_fix(tmp_path):
    from fusion.study import study_checkpoints

    (tmp_path / "prcc_autoencoder.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"cam16_resnet\.pt does not exist: run the study first"):
        study_checkpoints(tmp_path)
    (tmp_path / "cam16_resnet.pt").write_bytes(b"x")
    assert study_checkpoints(tmp_path) == {"prcc": tmp_path / "prcc_autoencoder.pt",
                                           "cam16": tmp_path / "cam16_resnet.pt"}


def test_machine_info_names_the_cpu_kernels_that_shape_the_numbers(monkeypatch):
    """The same config gives different numbers where torch's CPU kernels differ (NOTES.md), so a record says which."""
    import torch

    from fusion.study import machine_info

    info = machine_info()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "NEON", "SVE256"}
    assert {"cpu", "cpu_family", "cpu_model", "cpu_count", "torch_threads", "gpu", "torch"} <= set(info)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert machine_info()["torch_cpu_capability"] == "AVX2"
