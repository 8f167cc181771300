import pytest

from pipeline.errors import ConfigError
from pipeline.graph import build_graph, load_stages, select
from pipeline.targets import load_catalog

MODS = ["tests.fake_stages.source", "tests.fake_stages.middle", "tests.fake_stages.other", "tests.fake_stages.final"]


def _nodes(targets=("rtx3090", "rtx4090")):
    cat = load_catalog()
    return build_graph(load_stages(MODS), [cat[t] for t in targets])


def test_order_respects_deps_and_fans_out_per_target():
    nodes = _nodes()
    ids = [n.id for n in nodes]
    assert sorted(ids) == sorted(["source", "middle", "other", "final@rtx3090", "final@rtx4090"])
    pos = {nid: i for i, nid in enumerate(ids)}
    for n in nodes:
        for d in n.deps:
            assert pos[d] < pos[n.id], (d, n.id)
    final = {n.id: n for n in nodes}["final@rtx4090"]
    assert final.deps == ("middle",) and final.target.name == "rtx4090"
    assert ids == [n.id for n in _nodes()]  # deterministic


def test_select_until_and_target():
    nodes = _nodes()
    assert {n.id for n in select(nodes, until="middle")} == {"source", "middle"}
    assert {n.id for n in select(nodes, targets=["rtx4090"])} == {"source", "middle", "other", "final@rtx4090"}
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        select(nodes, until="nope")


def test_unknown_dep_and_cycle_are_errors():
    from dataclasses import replace

    from pipeline.graph import _toposort

    st = load_stages(MODS)
    mod, src = st["source"]
    bad = {**st, "source": (mod, replace(src, deps=("nope",)))}
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        build_graph(bad, [])
    cyc = {**st, "source": (mod, replace(src, deps=("middle",)))}
    with pytest.raises(ConfigError, match="cycle"):
        build_graph({k: v for k, v in cyc.items() if k != "final"}, [])
    assert _toposort({}) == []


def test_fan_in_from_per_target_is_refused():
    from dataclasses import replace

    st = load_stages(MODS)
    mod, other = st["other"]
    bad = {**st, "other": (mod, replace(other, deps=("final",)))}
    with pytest.raises(ConfigError, match="per-target"):
        build_graph(bad, [])
