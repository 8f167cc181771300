"""Drill-down: block boundaries found in exported graphs (both exporters), PyTorch hooks at the
same points, and the first block where the error jumps named correctly after corrupting a
weight (or one weight scale of a Q/DQ graph) in block k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.lib.parity import drilldown as dd

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
N_BLOCKS = 5


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Toy(torch.nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(8, d)
        self.blocks = torch.nn.ModuleList([Block(d) for _ in range(N_BLOCKS)])
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Toy, np.ndarray]:
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(12, 8)
    path = tmp_path_factory.mktemp(request.param) / "toy.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=request.param == "dynamo", input_names=["x"], output_names=["y"])
    return path, model, x.numpy()


def _torch_outs(model: Toy, x: np.ndarray) -> list[np.ndarray]:
    return dd.capture_torch([(b, "out") for b in model.blocks], lambda: model(torch.from_numpy(x)))


def _initializer(m: onnx.ModelProto, suffix: str) -> onnx.TensorProto:
    return next(i for i in m.graph.initializer if i.name.endswith(suffix))


def _weight_qdq(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every fc1/fc2 weight as INT8 + per-channel DequantizeLinear (unscoped nodes, like a quantizer adds)."""
    from onnx import helper, numpy_helper

    for init in [i for i in m.graph.initializer if ".fc" in i.name and i.name.endswith("weight")]:
        w = numpy_helper.to_array(init)
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        m.graph.initializer.remove(init)
        m.graph.initializer.extend([numpy_helper.from_array(q, init.name + "_q"),
                                    numpy_helper.from_array(scale, init.name + "_scale")])
        m.graph.node.insert(0, helper.make_node("DequantizeLinear", [init.name + "_q", init.name + "_scale"],
                                                [init.name], axis=0, name=f"DQ_{init.name}"))
    return m


def test_block_outputs_found_for_each_exporter(exported: tuple[Path, Toy, np.ndarray]) -> None:
    path, _, _ = exported
    points = dd.block_outputs(onnx.load(str(path)), "blocks")
    assert sorted(points) == list(range(N_BLOCKS))
    assert dd.block_outputs(onnx.load(str(path)), "layers") == {}


def test_clean_graph_has_no_jump(exported: tuple[Path, Toy, np.ndarray]) -> None:
    path, model, x = exported
    res = dd.drilldown(path, {"x": x}, "blocks", _torch_outs(model, x))
    assert len(res["blocks"]) == N_BLOCKS and all(b["cosine"] > 0.999999 for b in res["blocks"])
    assert res["jump"]["block"] is None


@pytest.mark.parametrize("k", [1, 3])
def test_corrupt_weight_in_block_k_is_named(exported: tuple[Path, Toy, np.ndarray], tmp_path: Path, k: int) -> None:
    from onnx import numpy_helper

    path, model, x = exported
    m = onnx.load(str(path))
    init = _initializer(m, f"blocks.{k}.fc1.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    res = dd.drilldown(bad, {"x": x}, "blocks", _torch_outs(model, x))
    assert res["jump"]["block"] == k, res["jump"]
    assert all(b["rel_l2"] < 1e-4 for b in res["blocks"][:k])  # blocks before k untouched


def test_corrupt_weight_scale_of_qdq_graph(exported: tuple[Path, Toy, np.ndarray], tmp_path: Path) -> None:
    path, model, x = exported
    k = 2
    m = _weight_qdq(onnx.load(str(path)))
    good = tmp_path / "qdq.onnx"
    onnx.save(m, str(good))
    ok = dd.drilldown(good, {"x": x}, "blocks", _torch_outs(model, x))
    assert len(ok["blocks"]) == N_BLOCKS and min(b["cosine"] for b in ok["blocks"]) > 0.999
    scale = _initializer(m, f"blocks.{k}.fc2.weight_scale")
    arr = onnx.numpy_helper.to_array(scale).copy()
    arr[: len(arr) // 2] *= 8.0  # one broken scale tensor: half its channels off by 8x
    scale.CopyFrom(onnx.numpy_helper.from_array(arr, scale.name))
    bad = tmp_path / "qdq_bad.onnx"
    onnx.save(m, str(bad))
    res = dd.drilldown(bad, {"x": x}, "blocks", _torch_outs(model, x))
    assert res["jump"]["block"] == k, res["jump"]


def test_row_order_recovers_a_permutation_and_alignment_uses_it() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 4)).astype(np.float32)
    perm = rng.permutation(8)
    assert (dd.row_order(base, base[perm]) == perm).all()
    assert dd.row_order(base, base[::2]) is None
    # torch side permuted, graph side in original order: the permutation candidate must win
    rows, used = dd.compare_blocks({0: base}, [base[perm]], [None, np.argsort(perm)])
    assert used == 1 and rows[0]["cosine"] == pytest.approx(1.0)


def test_find_jump_rules() -> None:
    def rows(rels: list[float]) -> list[dict[str, object]]:
        return [{"block": i, "status": "ok", "rel_l2": r, "cosine": 1 - r} for i, r in enumerate(rels)]

    assert dd.find_jump(rows([1e-5, 2e-5, 3e-5]))["block"] is None  # noise below the floor
    assert dd.find_jump(rows([0.01, 0.012, 0.2, 0.25, 0.5]))["block"] == 2  # first step >= half the largest
    assert dd.find_jump(rows([0.5, 0.5, 0.6]))["block"] == 0  # broken from the start
    assert dd.find_jump([{"block": 0, "status": "shape mismatch"}])["block"] is None


def test_node_block_reads_names_and_exporter_metadata() -> None:
    from onnx import helper

    n = helper.make_node("Add", ["a", "b"], ["c"], name="/model/layers.12/Add_1")
    assert dd.node_block(n, "layers") == 12 and dd.node_block(n, "blocks") is None
    m = helper.make_node("Add", ["a", "b"], ["c"], name="node_add_7")
    m.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'visual', 'visual.blocks.3', 'add_7']")
    assert dd.node_block(m, "blocks") == 3
    assert dd.node_block(helper.make_node("Relu", ["a"], ["b"], name="blocks_fused"), "blocks") is None


def test_rewritten_nodes_inherit_their_producers_block() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="/blocks.0/Relu"),
        helper.make_node("Relu", ["a"], ["b"], name="node_Gemm_7"),  # a fusion rewrite: no scope
        helper.make_node("QuantizeLinear", ["b", "s"], ["q"], name="b_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], name="b_DequantizeLinear"),
        helper.make_node("Relu", ["dq"], ["c"], name="/blocks.1/Relu"),
        helper.make_node("Relu", ["c"], ["y"], name="/head/Relu"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    m = helper.make_model(g)
    assert dd.node_blocks(m, "blocks") == [0, 0, None, None, 1, None]  # Q/DQ between blocks stay outside
    assert dd.block_outputs(m, "blocks") == {0: "b", 1: "c"}


def test_block_output_is_the_activation_not_its_quantized_copy() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="/stages.0/Relu"),
        helper.make_node("QuantizeLinear", ["a", "s"], ["q"], name="/stages.0/Relu_output_0_quantized"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], name="/stages.0/Relu_output_0_dequantized"),
        helper.make_node("Relu", ["dq"], ["y"], name="/stages.1/Relu"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])
    assert dd.block_outputs(helper.make_model(g), "stages") == {0: "a"}


def test_drilldown_runs_segment_by_segment(exported: tuple[Path, Toy, np.ndarray], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With cuts recorded at the block outputs the graph runs one block per session (no
    whole-graph session of a big decoder), with the figures of the uncut graph."""
    import json

    from stages.lib.segments import runner as S
    from stages.lib.segments.cuts import CUTS_KEY
    from stages.lib.segments.plan import Plan, Segment

    path, model, x = exported
    whole = dd.drilldown(path, {"x": x}, "blocks", _torch_outs(model, x))
    m = onnx.load(str(path))
    m.metadata_props.add(key=CUTS_KEY, value=json.dumps(list(dd.block_outputs(m, "blocks").values())))
    cut = tmp_path / "cut.onnx"
    onnx.save(m, str(cut))
    sessions: list[int] = []
    real = S._Session

    def counting(p: Plan, seg: Segment, *a: object) -> S._Session:
        sessions.append(seg.index)
        return real(p, seg, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(S, "_Session", counting)
    res = dd.drilldown(cut, {"x": x}, "blocks", _torch_outs(model, x))
    assert sessions == list(range(N_BLOCKS))  # one per block; the head after the last one is not needed
    for a, b in zip(res["blocks"], whole["blocks"], strict=True):
        assert a["tensor"] == b["tensor"] and a["cosine"] == pytest.approx(b["cosine"], abs=1e-9)
