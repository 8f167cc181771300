"""Cache keys must be stable across runs and machines (golden), and move with what they cover."""

from pathlib import Path

from pipeline.config_io import load_config
from pipeline.graph import build_graph, load_stages
from pipeline.hashing import HashMemo, digest, stable_json
from pipeline.keys import cache_key, key_material
from pipeline.targets import load_catalog

MODS = ["tests.fake_stages.source", "tests.fake_stages.middle", "tests.fake_stages.other", "tests.fake_stages.final"]


def _setup(tmp: Path, extra: str = ""):
    p = tmp / "c.yaml"
    p.write_text("model: {generate: tiny, family: qwen2_vl}\ntargets: [rtx4090]\n" + extra)
    cfg = load_config(p)
    nodes = {n.id: n for n in build_graph(load_stages(MODS), [load_catalog()["rtx4090"]])}
    return cfg, nodes


def test_stable_json_is_order_independent():
    assert stable_json({"b": 1, "a": [1, 2]}) == stable_json({"a": [1, 2], "b": 1})
    assert digest({"x": 1}) == "5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22"


def test_golden_key(tmp_path: Path):
    from dataclasses import replace

    from pipeline.targets import TargetSpec

    cfg, nodes = _setup(tmp_path)
    dep = {"middle": {"part1.txt": {"sha256": "a" * 64, "bytes": 3}}}
    # an inline target, so editing the catalog's prose does not move the golden key
    t = TargetSpec(name="rtx4090", sm="8.9", builder="tensorrt-rtx", precisions=("fp8", "int8"))
    mat = key_material(replace(nodes["final@rtx4090"], target=t), cfg, dep, HashMemo(None))
    assert mat["target"]["sm"] == "8.9" and mat["toolchain"] == {}
    # Golden: if this changes, every user's cache is invalidated. Change it on purpose only.
    assert cache_key(mat) == "14b665385ed927daba71b3a62e0c20b6"


def test_key_moves_with_params_inputs_version_target(tmp_path: Path):
    from dataclasses import replace

    cfg, nodes = _setup(tmp_path)
    n = nodes["final@rtx4090"]
    dep = {"middle": {"part1.txt": {"sha256": "a" * 64, "bytes": 3}}}
    base = cache_key(key_material(n, cfg, dep, HashMemo(None)))
    cfg2, _ = _setup(tmp_path, "engine: {workspace_mb: 64}\n")
    assert cache_key(key_material(n, cfg2, dep, HashMemo(None))) != base
    dep2 = {"middle": {"part1.txt": {"sha256": "b" * 64, "bytes": 3}}}
    assert cache_key(key_material(n, cfg, dep2, HashMemo(None))) != base
    n2 = replace(n, stage=replace(n.stage, version="2"))
    assert cache_key(key_material(n2, cfg, dep, HashMemo(None))) != base
    n3 = replace(n, target=load_catalog()["rtx5090"])
    assert cache_key(key_material(n3, cfg, dep, HashMemo(None))) != base
    n4 = replace(n3, stage=replace(n.stage, key_uses_target=False))
    n5 = replace(n, stage=replace(n.stage, key_uses_target=False))
    assert cache_key(key_material(n4, cfg, dep, HashMemo(None))) == cache_key(key_material(n5, cfg, dep, HashMemo(None)))


def test_external_file_contents_enter_the_key(tmp_path: Path):
    from dataclasses import replace

    cfg, nodes = _setup(tmp_path)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"1234")
    n = replace(nodes["source"], stage=replace(nodes["source"].stage, external=lambda c: [f]))
    k1 = cache_key(key_material(n, cfg, {}, HashMemo(None)))
    f.write_bytes(b"1235")
    assert cache_key(key_material(n, cfg, {}, HashMemo(None))) != k1
