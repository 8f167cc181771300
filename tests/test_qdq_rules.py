"""Each placement rule of stages/lib/qdq/rules.py on a tiny inline graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from stages.lib.qdq.placement import plan
from stages.lib.qdq.rules import MODES, NEVER_CUT_OPS, rules_for
from tests import qdq_graphs as G


def _ir(proto: onnx.ModelProto, attention: str | None = "canonical") -> ir.Model:
    return ir.from_proto(G.fused(proto, attention))


def _bmm_inputs(model: ir.Model) -> dict[str, str]:
    """Tensor names at the FP8 MHA sites of the one mha partition, by what they hold, and the
    names of its two BMMs (the fuse stage's rewrite names them)."""
    from stages.lib.fusion.annotate import Partitions

    parts = Partitions(model.graph)
    (group,) = list(parts)
    bmm1, bmm2 = parts.node(group, "bmm1"), parts.node(group, "bmm2")
    assert bmm1 is not None and bmm2 is not None
    return {"q": bmm1.inputs[0].name, "k": bmm1.inputs[1].name, "probs": bmm2.inputs[0].name,
            "v": bmm2.inputs[1].name, "bmm1": bmm1.name, "bmm2": bmm2.name}


def _sites(pl):
    return {(s.tensor, s.kind): s for s in pl.sites}


def test_tables_are_data():
    assert set(MODES) == {"int8", "fp8", "int4-weight"}
    assert rules_for("int8").ops["Conv"].weight_axis == 0
    assert rules_for("int8").ops["ConvTranspose"].weight_axis == 1
    assert rules_for("int8").ops["Conv"].never == (2,)
    assert rules_for("fp8").opset_min >= 19 and rules_for("int4-weight").opset_min >= 21
    with pytest.raises(ValueError, match="unknown"):
        rules_for("int3")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_conv_bn_relu_pool_never_cut(mode):
    pl = plan(_ir(G.conv_bn_relu_pool()).graph, mode)
    s = _sites(pl)
    # Q/DQ on the inputs of both convs (graph input, and after MaxPool) and their weights, per-channel axis 0.
    assert set(s) == {("x", "activation"), ("p", "activation"), ("w1", "weight"), ("w2", "weight")}
    assert s[("w1", "weight")].axis == 0
    # Never between Conv→BN→ReLU→MaxPool, and never the bias.
    assert not {"c1", "bn", "r", "b1"} & {t for t, _ in s}


def test_conv_transpose_axis1_and_gemm_transb():
    pl = plan(_ir(G.conv_transpose_gemm()).graph, "int8")
    s = _sites(pl)
    assert s[("wt", "weight")].axis == 1  # ConvTranspose W is [Cin, Cout, kh, kw]
    assert s[("wg", "weight")].axis == 0  # Gemm transB=1: W is [N, K], output channels on axis 0
    assert ("bg", "weight") not in s and ("bg", "activation") not in s  # bias never


def test_matmul_weight_along_output_dim_and_norm_untouched():
    for norm in ("layernorm", "rms"):
        g = _ir(G.mlp_block(norm=norm)).graph
        pl = plan(g, "int8")
        s = _sites(pl)
        assert s[("w_up", "weight")].axis == 1  # [K, N]: N is the output dim
        assert ("h", "activation") in s and ("g", "activation") in s  # after the norm / GELU
        produced_by = {o.name: n.op_type for n in g for o in n.outputs}
        for t, kind in s:
            if kind == "activation":
                # the tensor leaves the norm/GELU chain: no chain-internal tensor is quantized
                assert t in ("h", "g")
        assert produced_by["h"] in ("LayerNormalization", "Mul")


def test_gemv_and_tiny_matmuls_are_skipped():
    pl = plan(_ir(G.mlp_block()).graph, "int8")
    why = {d["node"]: d["why"] for d in pl.skipped if d["rule"] == "small-matmul"}
    assert "GEMV-like" in why["head/gemv/MatMul"]
    assert "tiny" in why["head/tiny/MatMul"]
    # decode-time shapes (M = 1) turn the MLP into GEMVs: why prefill-length calibration matters
    pl1 = plan(_ir(G.mlp_block(seq=1)).graph, "int8")
    assert "mlp/up/MatMul" in {d["node"] for d in pl1.skipped}


def test_residual_add_quantizes_the_skip_input():
    pl = plan(_ir(G.residual_conv()).graph, "int8")
    x = _sites(pl)[("x", "activation")]
    assert ("add1", 1) in x.uses  # the skip input of the Add
    assert all(t != "c1" for t, _ in _sites(pl))  # the conv branch fuses into its epilogue
    # int4 is weight-only: no residual rule
    assert all(s.kind == "weight" for s in plan(_ir(G.residual_conv()).graph, "int4-weight").sites)


def test_concat_inputs_share_one_scale_group():
    pl = plan(_ir(G.concat_convs()).graph, "int8")
    s = _sites(pl)
    groups = {s[(t, "activation")].group for t in ("x1", "x2", "cat")}
    assert len(groups) == 1 and None not in groups


def test_attention_bmms_left_high_precision_by_default():
    m = _ir(G.mha_block())
    pl = plan(m.graph, "int8")
    s = _sites(pl)
    names = _bmm_inputs(m)
    assert {("wq", "weight"), ("wo", "weight"), ("x", "activation"), ("o2", "activation")} <= set(s)
    assert not {names[k] for k in ("q", "k", "probs", "v")} & {t for t, _ in s}
    skipped = {d["node"]: d["why"] for d in pl.skipped if d["rule"] == "attention"}
    assert set(skipped) == {names["bmm1"], names["bmm2"]}
    assert all("mha/0000" in why for why in skipped.values())
    with pytest.raises(ValueError, match="not available"):
        plan(_ir(G.mha_block()).graph, "int8", attention="fp8-mha")


def test_fp8_mha_pattern():
    m = _ir(G.mha_block())
    names = _bmm_inputs(m)
    s = _sites(plan(m.graph, "fp8", attention="fp8-mha"))
    assert s[(names["q"], "activation")].rule == "fp8-mha.bmm1" and (names["k"], "activation") in s
    assert s[(names["probs"], "activation")].fixed_amax == 1.0  # softmax output scale 1/448
    assert s[(names["v"], "activation")].rule == "fp8-mha.bmm2"
    # head_dim 4 is outside (8, 256]: the pattern does not apply
    m2 = _ir(G.mha_block(d=16, heads=4))
    pl2 = plan(m2.graph, "fp8", attention="fp8-mha")
    assert not {_bmm_inputs(m2)["q"], _bmm_inputs(m2)["probs"]} & {t for t, _ in _sites(pl2)}


def test_attention_not_tagged_by_the_fuse_stage_is_not_quantized():
    """The un-rewritten export (scale on the scores, as torch writes it) is no partition: TensorRT
    would not run it as one fused MHA, so FP8 MHA Q/DQ is not placed on it."""
    m = _ir(G.mha_block(), attention=None)
    pl = plan(m.graph, "fp8", attention="fp8-mha")
    assert not [s for s in pl.sites if s.rule.startswith("fp8-mha")]
    assert {d["node"] for d in pl.skipped if d["rule"] == "attention"} == {"attn/bmm1", "attn/bmm2"}
    assert all("no fused attention partition" in d["why"] for d in pl.skipped if d["rule"] == "attention")


def test_keep_patterns_and_default_keeps():
    pl = plan(_ir(G.mha_block()).graph, "int8", keep=("*q_proj*",))
    assert ("wq", "weight") not in _sites(pl)
    assert pl.kept[0]["node"] == "attn/q_proj/MatMul" and "q_proj" in pl.kept[0]["why"]


def test_int4_weight_only_blocks_along_k():
    pl = plan(_ir(G.mlp_block(d=128)).graph, "int4-weight")
    s = _sites(pl)
    assert all(k == "weight" for _, k in s)
    assert s[("w_up", "weight")].axis == 0  # blocks along K of [K, N]
    assert "Conv" not in rules_for("int4-weight").ops


def test_never_cut_ops_cover_norms_softmax_and_data_movement():
    for op in ("LayerNormalization", "Softmax", "Gelu", "Reshape", "Transpose", "Concat", "Where"):
        assert op in NEVER_CUT_OPS


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_no_dq_feeds_a_never_cut_op_after_insertion(mode):
    from stages.lib.qdq.recipe import Calib, Recipe, build

    proto = G.mha_block()
    m = _ir(proto)
    names = [v.name for n in m.graph for v in list(n.inputs) + list(n.outputs) if v is not None]
    calib = Calib(amax=dict.fromkeys(names, 4.0), amax_fp8=dict.fromkeys(names, 4.0))
    built = build(onnx.shape_inference.infer_shapes(proto), Recipe(mode), calib)
    for node in built.model.graph:
        if node.op_type == "DequantizeLinear":
            for use in node.outputs[0].uses():
                assert use.node.op_type not in NEVER_CUT_OPS, (node.name, use.node.op_type)
    assert np.isfinite(len(list(built.model.graph)))


def test_keep_patterns_match_the_exported_module_path():
    proto = G.mha_block()
    node = next(n for n in proto.graph.node if n.name == "attn/k_proj/MatMul")
    node.name = "node_linear_1"  # dynamo-style name; the module path lives in metadata
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "['', 'model', 'model.layers.0.self_attn.k_proj', 'linear_1']"
    pl = plan(_ir(proto).graph, "int8", keep=("*self_attn.k_proj",))
    assert pl.kept == [{"node": "node_linear_1", "pattern": "*self_attn.k_proj",
                        "why": "keep_high_precision pattern '*self_attn.k_proj'"}]
    assert pl.scopes["node_linear_1"] == "model.layers.0.self_attn.k_proj"


def test_fp8_mha_pattern_through_precision_casts():
    """Exporters run softmax in fp32 inside fp16 graphs: the fuse stage drops the Cast pair into
    the canonical pattern, and the fixed 1/448 Q/DQ lands on the tensor BMM2 reads."""
    m = _ir(G.mha_block(dt=np.float16, casts=True))
    names = _bmm_inputs(m)
    s = _sites(plan(m.graph, "fp8", attention="fp8-mha"))
    probs = s[(names["probs"], "activation")]
    assert probs.fixed_amax == 1.0 and probs.uses == [(names["bmm2"], 0)]
    assert (names["q"], "activation") in s and (names["v"], "activation") in s


def test_fp8_keeps_the_layer_reading_pixels_even_when_renamed():
    proto = G.conv_bn_relu_pool()
    proto.graph.input[0].name = "pixel_values"
    proto.graph.node[0].input[0] = "pixel_values"
    pl = plan(_ir(proto).graph, "fp8")
    assert [k["node"] for k in pl.kept] == ["conv1"] and "pixel_values" in pl.kept[0]["why"]
    assert ("w1", "weight") not in _sites(pl) and ("w2", "weight") in _sites(pl)
    assert not plan(_ir(proto).graph, "int8").kept  # INT8 has no such default


def test_placement_follows_the_partitions():
    """Placement's only knowledge of what fuses is the fuse stage's tags: change a partition and
    the sites move with it."""
    from stages.lib.fusion import annotate

    def node(m: ir.Model, name: str) -> ir.Node:
        return next(n for n in m.graph if n.name == name)

    # a residual Add taken out of its partition: no skip site any more
    m = _ir(G.residual_conv())
    assert ("add1", 1) in _sites(plan(m.graph, "int8"))[("x", "activation")].uses
    for key in (annotate.GROUP, annotate.KIND, annotate.ROLE):
        node(m, "add1").metadata_props.pop(key)
    assert all(s.rule != "residual-add.skip" for s in plan(m.graph, "int8").sites)

    # the second conv put into the first partition (as if TensorRT fused MaxPool→Conv): its
    # input edge is now inside a partition and is not cut
    m = _ir(G.conv_bn_relu_pool())
    assert ("p", "activation") in _sites(plan(m.graph, "int8"))
    group = node(m, "pool1").metadata_props[annotate.GROUP]
    annotate.tag(node(m, "conv2"), group, "conv_act", "conv")
    pl = plan(m.graph, "int8")
    assert ("p", "activation") not in _sites(pl)
    assert {"node": "conv2", "rule": "never-cut", "why": f"input p is inside the fused partition {group}"} in pl.skipped

    # an mha partition untagged: the FP8 MHA sites go, the BMMs stay high precision
    m = _ir(G.mha_block())
    names = _bmm_inputs(m)
    assert names["probs"] in {s.tensor for s in plan(m.graph, "fp8", attention="fp8-mha").sites}
    annotate.clear(m)
    pl = plan(m.graph, "fp8", attention="fp8-mha")
    assert not {names[k] for k in ("q", "k", "probs", "v")} & {s.tensor for s in pl.sites}
    assert {d["node"] for d in pl.skipped if d["rule"] == "attention"} == {names["bmm1"], names["bmm2"]}


def test_conv_add_without_activation_is_a_partition():
    """Conv→Add (no activation after it) still fuses in TensorRT (an elementwise sum merges into
    the conv): the fuse stage tags it, and placement quantizes only the skip input."""
    proto = G.residual_conv()
    del proto.graph.node[2]  # the Relu
    proto.graph.node[2].input[0] = "a"
    m = _ir(proto)
    roles = {n.name: n.metadata_props.get("vlmforge.fusion.role") for n in m.graph}
    assert roles["conv1"] == "conv" and roles["add1"] == "residual_add"
    s = _sites(plan(m.graph, "int8"))
    assert ("add1", 1) in s[("x", "activation")].uses and ("c1", "activation") not in s
