"""Attention rule on tiny exporter-shaped graphs: matches, structure, ORT equality (FP32 1e-5)."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from stages.lib.fusion import apply_rules, op_histogram, resolve_attention_mode
from stages.lib.fusion.annotate import GROUP, ROLE, read_fusion_groups
from stages.lib.fusion.check import compare, random_feeds
from tests.fusion_samples import AttnSpec, attention_model

VARIANTS = {
    "vit_plain": AttnSpec(),
    "vit_window_torchlib": AttnSpec(scale="qk_sqrt_both", torchlib_kt=True, mask="window"),
    "div_scale_causal": AttnSpec(scale="qk_div", mask="causal"),
    "decoder_kv_gqa": AttnSpec(kv_cache=True, n_rep=2, mask="input"),
    "decoder_kv_gqa_causal_fp32_cast": AttnSpec(kv_cache=True, n_rep=2, mask="causal", softmax_fp32=True),
    "no_scale": AttnSpec(scale="none", mask="causal"),
    # as the real Qwen exports write it: FP32 upcast right after BMM1, scale and FP32 mask after
    "decoder_upcast_after_bmm1": AttnSpec(kv_cache=True, n_rep=2, mask="input", softmax_fp32=True, upcast_at="bmm"),
    "vit_upcast_after_bmm1_no_scale": AttnSpec(scale="none", mask="window", softmax_fp32=True, upcast_at="bmm"),
}


def _fuse(spec: AttnSpec, mode: str) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    import onnx_ir as ir

    m = attention_model(spec)
    onnx.checker.check_model(m)
    mi = ir.from_proto(m)
    rep = apply_rules(mi, attention=mode, fold_batchnorm=True, cleanup=True)
    out = ir.to_proto(mi)
    onnx.checker.check_model(out)
    return m, out, rep


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("opset", [19, 23])
def test_rewrite_keeps_numerics(name: str, opset: int) -> None:
    spec = dataclasses.replace(VARIANTS[name], opset=opset, layers=2)
    mode = resolve_attention_mode("auto", opset)
    before, after, rep = _fuse(spec, mode)
    # in FP32 the Casts are no-ops that cleanup removes: without a scale the export is canonical
    already_canonical = mode == "canonical" and spec.scale == "none"
    assert rep["rules"][f"attention[{mode}]"]["matches"] == (0 if already_canonical else 2)
    assert rep["mha_groups"] == 2 and rep["unfused_softmax"] == 0
    cmp = compare(before, after, random_feeds(before, seed=3))
    assert cmp["max_abs"] <= 1e-5 * max(1.0, cmp["ref_max"]), cmp
    ops = {n.op_type for n in after.graph.node}
    assert "Cast" not in ops and "Div" not in ops
    if spec.kv_cache:  # the KV-cache Concat stays outside, present outputs unchanged
        assert sum(n.op_type == "Concat" for n in after.graph.node) == 4
        assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]


def test_canonical_structure_is_what_tensorrt_matches() -> None:
    _, after, _ = _fuse(AttnSpec(scale="qk_sqrt_both", torchlib_kt=True, mask="causal", softmax_fp32=True), "canonical")
    prod = {o: n for n in after.graph.node for o in n.output}
    inits = {i.name for i in after.graph.initializer}
    (sm,) = [n for n in after.graph.node if n.op_type == "Softmax"]
    add = prod[sm.input[0]]
    assert add.op_type == "Add"
    bmm1 = prod[add.input[0]]
    assert bmm1.op_type == "MatMul"
    q_scale = prod[bmm1.input[0]]  # the scale sits on Q, so a DQ can feed BMM1 directly
    assert q_scale.op_type == "Mul" and q_scale.input[1] in inits
    k_side = prod.get(bmm1.input[1])
    assert k_side is None or k_side.op_type != "Mul"  # torchlib's √scale on Kᵀ is gone
    (bmm2,) = [n for n in after.graph.node if sm.output[0] in n.input]
    assert bmm2.op_type == "MatMul" and bmm2.input[0] == sm.output[0]
    roles = {name: role for name, (_, _, role) in read_fusion_groups(after).items()}
    assert roles[q_scale.name] == "q_scale" and roles[bmm1.name] == "bmm1"
    assert roles[sm.name] == "softmax" and roles[bmm2.name] == "bmm2" and roles[add.name] == "mask_add"


def test_onnx_attention_drops_gqa_repeat_and_has_no_present_outputs() -> None:
    spec = AttnSpec(opset=23, kv_cache=True, n_rep=2, mask="causal")
    _, after, _ = _fuse(spec, "onnx-attention")
    hist = {n.op_type for n in after.graph.node}
    assert "Expand" not in hist and "Softmax" not in hist
    (att,) = [n for n in after.graph.node if n.op_type == "Attention"]
    assert len(att.output) == 1  # NVIDIA/TensorRT#4738: no present-KV outputs on the op
    props = {p.key: p.value for p in att.metadata_props}
    assert props[ROLE] == "attention" and props[GROUP].startswith("mha/")


def test_onnx_attention_refused_below_opset_23() -> None:
    with pytest.raises(ValueError, match="opset >= 23"):
        resolve_attention_mode("onnx-attention", 19)
    with pytest.raises(ValueError, match="opset >= 23"):
        _fuse(AttnSpec(opset=19), "onnx-attention")


def test_second_pass_finds_nothing() -> None:
    import onnx_ir as ir

    _, after, _ = _fuse(AttnSpec(mask="causal"), "canonical")
    again = apply_rules(ir.from_proto(after), attention="canonical", fold_batchnorm=True, cleanup=True)
    assert again["rules"]["attention[canonical]"]["matches"] == 0 and again["mha_groups"] == 1


def test_softmax_over_other_axis_is_left_alone() -> None:
    import onnx_ir as ir

    m = attention_model(AttnSpec())
    for n in m.graph.node:
        if n.op_type == "Softmax":
            n.attribute[0].i = 2  # not the key axis: not attention
    rep = apply_rules(ir.from_proto(m), attention="canonical", fold_batchnorm=False, cleanup=True)
    assert rep["rules"]["attention[canonical]"]["matches"] == 0 and rep["unfused_softmax"] == 1


def test_non_constant_scale_is_left_alone() -> None:
    import onnx_ir as ir
    from onnx import helper

    m = attention_model(AttnSpec(scale="qk_mul"))
    m.graph.initializer.remove(next(i for i in m.graph.initializer if i.name == "l0_scale"))
    m.graph.input.append(helper.make_tensor_value_info("l0_scale", onnx.TensorProto.FLOAT, []))
    mi = ir.from_proto(m)
    rep = apply_rules(mi, attention="canonical", fold_batchnorm=False, cleanup=True)
    assert rep["rules"]["attention[canonical]"]["matches"] == 0
    assert op_histogram(mi)["Softmax"] == 1


@pytest.mark.parametrize("upcast_at", ["softmax", "bmm"])
@pytest.mark.parametrize("opset", [19, 23])
def test_fp16_within_half_precision(upcast_at: str, opset: int) -> None:
    spec = AttnSpec(dtype="float16", softmax_fp32=True, mask="causal", kv_cache=True, upcast_at=upcast_at, opset=opset)
    before, after, rep = _fuse(spec, resolve_attention_mode("auto", opset))
    cmp = compare(before, after, random_feeds(before, seed=1))
    assert rep["mha_groups"] == 1 and cmp["max_abs"] <= 1e-2 * max(1.0, cmp["ref_max"])


def test_fp32_mask_minimum_stays_finite_in_fp16() -> None:
    """A fully masked row: float32's minimum would be −inf in FP16 and the softmax NaN."""
    import numpy as np

    spec = AttnSpec(dtype="float16", softmax_fp32=True, upcast_at="bmm", mask="input")
    before, after, _ = _fuse(spec, "canonical")
    feeds = random_feeds(before, seed=2)
    feeds["mask"][..., 0, :] = np.finfo(np.float32).min  # query row 0 sees no key
    from stages.lib.fusion.check import ort_run

    assert np.isfinite(ort_run(after, feeds)[0]).all()
