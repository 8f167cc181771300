"""What re-keys which real stage: the cache must re-run exactly what a config change touches."""

from pathlib import Path

from pipeline.config_io import load_config
from pipeline.graph import build_graph, load_stages
from pipeline.hashing import HashMemo
from pipeline.keys import cache_key, key_material
from pipeline.targets import load_catalog

BASE = "model: {generate: tiny, family: qwen2_5_vl}\ntargets: [rtx3090, rtx4090, rtx5090]\n"


def _keys(tmp: Path, extra: str = "") -> dict[str, str]:
    p = tmp / f"c{abs(hash(extra))}.yaml"
    p.write_text(BASE + extra)
    cfg = load_config(p)
    cat = load_catalog()
    nodes = build_graph(load_stages(), [cat[t] for t in cfg.targets])
    fake_outputs = {"x": {"sha256": "0" * 64, "bytes": 1}}  # same upstream contents for every config
    return {n.id: cache_key(key_material(n, cfg, {d: fake_outputs for d in n.deps}, HashMemo(None))) for n in nodes}


def test_changing_the_qdq_recipe_does_not_recalibrate(tmp_path: Path):
    base = _keys(tmp_path)
    recipe = _keys(tmp_path, "quantize: {decoder: {keep_high_precision: ['*q_proj*']}}\n")
    assert recipe["calibrate"] == base["calibrate"]
    assert recipe["quantize@rtx4090"] != base["quantize@rtx4090"]
    method = _keys(tmp_path, "calibration: {method: percentile}\n")
    assert method["calibrate"] != base["calibrate"]


def test_targets_with_the_same_precisions_share_quantize_work(tmp_path: Path):
    k = _keys(tmp_path)
    assert k["quantize@rtx4090"] == k["quantize@rtx5090"]  # both fp8
    assert k["quantize@rtx3090"] != k["quantize@rtx4090"]  # int8
    assert len({k[f"engine@{t}"] for t in ("rtx3090", "rtx4090", "rtx5090")}) == 3  # engines are per SM


def test_precision_policy_does_not_touch_exports(tmp_path: Path):
    base = _keys(tmp_path)
    fp16 = _keys(tmp_path, "precision: {vision: fp16, decoder: fp16}\n")
    for node in ("checkpoint", "export_vision", "export_decoder", "fuse", "calibrate", "reference"):
        assert fp16[node] == base[node], node
    assert fp16["quantize@rtx4090"] != base["quantize@rtx4090"]
