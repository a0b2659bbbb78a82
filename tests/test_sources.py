"""Sources and arms from config: an external timm backbone as a source, its random twin, and the
self-contained fusion checkpoint that refuses a changed weights file."""

from __future__ import annotations

import pytest
import torch
import yaml
from fusion_fakes import nest, tiny_checkpoints, write_wbc_folder

from fusion.sources import SourceError, build_registry, twin_seed
from fusion.sweep import SweepConfig, run_sweep
from pretrain.checkpoint import CheckpointError, build_model, load_checkpoint
from pretrain.config import parse_config
from pretrain.utils import read_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    weights = root / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return {"weights": weights, "wbc": write_wbc_folder(root / "wbc", 8, 16), "ck": tiny_checkpoints(root / "ck")}


def test_twin_seeds_come_from_the_name_not_a_position():
    assert twin_seed("prcc", 2) == 10_201 and twin_seed("cam16", 2) == 10_200  # the record's seeds
    assert twin_seed("r18", 0) == twin_seed("r18", 0) != twin_seed("r18", 1) != twin_seed("vit", 1)
    reg = build_registry({"r18": "timm:resnet18"}, {"imagenet": ["r18"]},
                         {"prcc_checkpoint": "p.pt", "cam16_checkpoint": "c.pt"})
    assert reg.arm("random:imagenet").twin_of == "imagenet" and reg.twin("imagenet") == "random:imagenet"
    assert reg.twin("prcc+cam16") == "random"  # the original name of that twin


@pytest.mark.parametrize("sources, arms, match", [
    ({}, {"imagenet": ["r18"]}, r"source\(s\) \['r18'\] that are not defined"),
    ({"r18": "timm:resnet18"}, {"random:x": ["r18"]}, "reserved for random twins"),
    ({"scratch": "a.pt"}, {}, "reserved for arms"),
    ({"r18": {"model": "keras:resnet"}}, {}, "must start with one of"),
    ({"r18": {"modle": "timm:resnet18"}}, {}, "unknown key"),
    ({"r18": "timm:resnet18"}, {"imagenet": "r18"}, "must list source names"),
])
def test_bad_sources_and_arms_name_the_problem(sources, arms, match):
    with pytest.raises(SourceError, match=match):
        reg = build_registry(sources, arms)
        for a in arms:
            reg.arm(a)


def test_a_timm_source_from_yaml_is_fused_with_its_twin_and_reloads(files, tmp_path):
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(nest(**{
        "data": str(files["wbc"]), "cache_dir": "", "val": 0.25, "test": 0.25, "image_size": 16,
        "cnn_channels": [8], "epochs": 1, "min_steps": 2, "max_steps": 0, "evals": 1, "batch_size": 16,
        "sources": {"tm": {"model": "timm:test_resnet", "weights": str(files["weights"]), "input_size": 32}},
        "arms": {"scratch": [], "tm": ["tm"]}, "modes": ["concat"], "fractions": [1.0], "seeds": [0],
        "prcc_checkpoint": str(files["ck"]["prcc"]), "out": str(tmp_path / "sweep"), "progress": False,
        "device": "cpu", "curves": False})))
    cfg, _ = parse_config(SweepConfig, ["--config", str(cfg_path)])
    assert cfg.arms == ["scratch", "tm", "random:tm"]  # the twin is added
    rows = {r["arm"]: r for r in read_jsonl(run_sweep(cfg))}
    assert set(rows) == {"scratch", "tm", "random:tm"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["random:tm"]["twin_of"] == "tm" and rows["tm"]["sources"] == ["tm"]

    run = tmp_path / "sweep" / "runs" / "f1.0_tm_concat_s0" / "best.pt"
    ckpt = load_checkpoint(run, kind="wbc_fusion")
    assert ckpt["config"]["sources"]["tm"]["model"] == "timm:test_resnet"
    model = build_model(ckpt).eval()
    enc = model.encoders["tm"]
    assert enc.pretrained and enc.input_size == 32 and not any(p.requires_grad for p in enc.parameters())
    twin = build_model(load_checkpoint(run.parents[1] / "f1.0_random:tm_concat_s0" / "best.pt")).encoders["tm"]
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(enc.encode(x), twin.encode(x))  # random weights, not the file's

    files["weights"].write_bytes(files["weights"].read_bytes() + b" ")  # the encoder file changes
    try:
        with pytest.raises(CheckpointError, match="changed since this fusion model was trained"):
            build_model(ckpt)
    finally:
        files["weights"].write_bytes(files["weights"].read_bytes()[:-1])
