"""The streaming quantize path (issue 11): every run through the block runner, sensitivity scored
per block past a size (``stages.lib.qdq.sensitivity``, ``block_scores``), on a decoder-like chain
with external data and a cut list (tests/quantize_chain.py), and on a vision tower's layout
(name scopes, no recorded cuts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from stages.lib.qdq import graphio, heldout
from stages.lib.qdq import sensitivity as S
from stages.lib.qdq.block_scores import extract
from stages.lib.qdq.recipe import Calib, Recipe, build
from stages.lib.segments import runner as segments
from stages.lib.segments.plan import plan
from tests.quantize_chain import calibrate, chain_feeds, decoder_chain


def test_run_all_same_runner_for_files_and_models(tmp_path: Path) -> None:
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64)
    from_file = heldout.run_all(path, feeds, ["logits"])
    in_memory = heldout.run_all(graphio.load(path), feeds, ["logits"])
    for a, b in zip(from_file, in_memory, strict=True):
        np.testing.assert_array_equal(a["logits"], b["logits"])
    assert len(plan(path).segments) == 4  # three layers, then the head
    whole = graphio.run(graphio.session(path), feeds[0])["logits"].astype(np.float32)
    np.testing.assert_allclose(from_file[0]["logits"], whole, atol=2e-2, rtol=2e-2)  # FP16 at the cuts


def test_extract_cuts_out_one_block(tmp_path: Path) -> None:
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64)
    ref = segments.run_whole(path, feeds[0], ["x1", "x2"])
    sub = extract(ir.from_proto(graphio.load_proto(path, in_file=True)), {"x1": ref["x1"].dtype}, ["x2"])
    assert [v.name for v in sub.graph.inputs] == ["x1"] and set(sub.graph.initializers) == {"gamma1", "up1", "down1"}
    with graphio.spilled(sub, tmp_path) as sub_path:
        got = segments.run_whole(sub_path, {"x1": ref["x1"]}, cuts=[])
    np.testing.assert_array_equal(got["x2"], ref["x2"])


@pytest.mark.parametrize("block", [True, False], ids=["block", "whole"])
def test_sensitivity_ranks_the_sabotaged_layer_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    block: bool) -> None:
    if block:  # the tiny chain past the size where groups are scored at their own block
        monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r1"] *= 40  # layer 1's down projection input: by far the worst
    ev = S.Evaluator(feeds, heldout.run_all(path, feeds, ["logits"]), ["logits"], workdir=tmp_path)
    built, rep = S.run(path, Recipe("int8"), calib, 0.9999, ev)
    assert rep.scored == ("block" if block else "whole graph")
    assert rep.ranking[0]["group"] == "layers.1/mlp"
    if block:
        assert {r["scored_at"] for r in rep.ranking} == {"x1", "x2", "x3", "logits"}
    assert rep.kept[0]["group"] == "layers.1/mlp" and rep.met
    assert "/model/layers.1/mlp/down_proj/MatMul" not in built.placement.quantized_nodes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("vlmforge-qdq-")]  # candidates removed


def test_block_ranking_reuses_the_references_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search references' own pass keeps every value a segment hands on (reference_pass):
    the ranking then runs no pass of the unquantized graph and ranks exactly as with its own."""
    from stages.lib.qdq import block_scores

    monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r1"] *= 40
    refs, values = block_scores.reference_pass(path, feeds, ["logits"])
    for a, b in zip(refs, heldout.run_all(path, feeds, ["logits"]), strict=True):
        np.testing.assert_array_equal(a["logits"], b["logits"])  # the same runner as the candidates'
    runs: list[str] = []
    real = segments.run_segmented
    monkeypatch.setattr(segments, "run_segmented", lambda src, *a, **k: (runs.append(Path(src).name), real(src, *a, **k))[1])
    ranked = {}
    for given in (values, None):
        runs.clear()
        ev = S.Evaluator(feeds, refs, ["logits"], workdir=tmp_path, values=given)
        ranked[given is None] = block_scores.block_ranking(path, graphio.load_proto(path, in_file=True), Recipe("int8"),
                                                           calib, _groups(path, calib), ev, block_scores.rank_cuts(
                                                               graphio.load_proto(path, in_file=True)))
        assert runs.count("decoder.onnx") == (0 if given is not None else 1)
    assert ranked[True] == ranked[False]
    assert max(ranked[True], key=lambda r: r["loss"])["group"] == "layers.1/mlp"  # the sabotaged one


def _groups(path: Path, calib: Calib) -> dict[str, list[str]]:
    b = build(graphio.load_proto(path, in_file=True), Recipe("int8"), calib)
    groups: dict[str, list[str]] = {}
    for node in sorted(b.placement.quantized_nodes()):
        groups.setdefault(S.group_of(b.placement.scopes.get(node) or node), []).append(node)
    return groups


def test_a_tower_without_recorded_cuts_is_ranked_at_its_name_scope_blocks(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A vision tower records no cuts (it runs whole everywhere else); past RANK_WHOLE_BYTES its
    groups are still scored block by block, split at its ``blocks.N`` name scopes."""
    monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64, scope="blocks")
    assert len(plan(path).segments) == 1  # the runner runs it whole
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r2"] *= 40  # block 2's down projection input
    ev = S.Evaluator(feeds, heldout.run_all(path, feeds, ["logits"]), ["logits"], workdir=tmp_path)
    built, rep = S.run(path, Recipe("int8"), calib, 0.9999, ev)
    assert rep.scored == "block" and rep.ranking[0]["group"] == "blocks.2/mlp"
    assert {r["scored_at"] for r in rep.ranking} == {"x1", "x2", "x3", "logits"}
    assert rep.kept[0]["group"] == "blocks.2/mlp" and rep.met
