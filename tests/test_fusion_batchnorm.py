"""BN folding and Conv→act partition tags on a tiny conv stack: ORT equality (FP32, 1e-5)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from stages.lib.fusion import apply_rules, op_histogram
from stages.lib.fusion.annotate import read_fusion_groups
from stages.lib.fusion.batchnorm import annotate_conv_partitions, fold_batchnorm
from stages.lib.fusion.check import compare, random_feeds
from tests.fusion_samples import conv_model


def test_fold_batchnorm_rule_alone_keeps_numerics() -> None:
    import onnx_ir as ir

    m = conv_model(seed=1)
    mi = ir.from_proto(m)
    assert fold_batchnorm(mi) == 3
    out = ir.to_proto(mi)
    onnx.checker.check_model(out)
    assert "BatchNormalization" not in op_histogram(mi)
    cmp = compare(m, out, random_feeds(m, {"batch": 2}, seed=5))
    assert cmp["max_abs"] <= 1e-5 * max(1.0, cmp["ref_max"]), cmp


def test_folded_weights_are_recomputed() -> None:
    import onnx_ir as ir

    m = conv_model(seed=2)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    mi = ir.from_proto(m)
    fold_batchnorm(mi)
    conv = next(n for n in mi.graph if n.op_type == "Conv" and n.inputs[0].name == "pixel_values")
    w = conv.inputs[1].const_value.numpy()
    g, v = inits["stem_g"], inits["stem_v"]
    expect = inits["stem_w"] * (g / np.sqrt(v + 1e-5))[:, None, None, None]
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    b = conv.inputs[2].const_value.numpy()
    np.testing.assert_allclose(b, inits["stem_b"] - inits["stem_m"] * g / np.sqrt(v + 1e-5), rtol=1e-5, atol=1e-7)


def test_partitions_tagged_for_the_qdq_stage() -> None:
    import onnx_ir as ir

    m = conv_model()
    mi = ir.from_proto(m)
    rep = apply_rules(mi, attention=None, fold_batchnorm=True, cleanup=True)
    assert rep["rules"]["fold_batchnorm"]["matches"] == 3
    assert rep["conv_act_groups"] == 3
    out = ir.to_proto(mi)
    table = read_fusion_groups(out)
    roles = sorted(r for _, k, r in table.values() if k == "conv_act")
    assert roles == sorted(["conv", "act", "pool", "conv", "act", "conv", "residual_add", "act"])
    # every Relu/MaxPool sits in the same group as the Conv feeding it
    prod = {o: n for n in out.graph.node for o in n.output}
    for n in out.graph.node:
        if n.op_type in ("Relu", "MaxPool"):
            src = prod[n.input[0]]
            assert table[n.name][0] == table[src.name][0]
    cmp = compare(m, out, random_feeds(m, {"batch": 1}))
    assert cmp["max_abs"] <= 1e-5 * max(1.0, cmp["ref_max"])


def test_unfolded_bn_stays_in_partition_and_fanout_breaks_it() -> None:
    import onnx_ir as ir
    from onnx import helper

    m = conv_model()
    mi = ir.from_proto(m)
    assert annotate_conv_partitions(mi) == 3  # Conv→BN→Relu chains, BN not folded
    roles = [n.metadata_props.get("vlmforge.fusion.role") for n in mi.graph if n.op_type == "BatchNormalization"]
    assert roles.count("bn") == 3
    # a conv output that is also a graph output cannot fuse its activation
    m.graph.output.append(helper.make_tensor_value_info("stem_conv", onnx.TensorProto.FLOAT, None))
    mi = ir.from_proto(m)
    assert annotate_conv_partitions(mi) == 2


@pytest.mark.parametrize("fold", [True, False])
def test_fold_flag_is_honoured_by_cleanup(fold: bool) -> None:
    import onnx_ir as ir

    mi = ir.from_proto(conv_model())
    apply_rules(mi, attention=None, fold_batchnorm=fold, cleanup=True)
    assert ("BatchNormalization" in op_histogram(mi)) is (not fold)


def test_projection_shortcut_add_belongs_to_one_partition() -> None:
    """Conv→BN on both Add inputs (ResNet downsample): the Add and its ReLU join input 0's
    partition only; the shortcut conv (input 1) stays untagged, its output is the skip."""
    import onnx_ir as ir

    m = conv_model()
    # turn the identity skip into a projection: pool → Conv → BN → Add input 1
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8, 1, 1)).astype(np.float32), "proj_w")
    m.graph.initializer.append(w)
    add = next(n for n in m.graph.node if n.name == "blk_add")
    proj = onnx.helper.make_node("Conv", ["pool", "proj_w"], ["proj_out"], name="proj_conv")
    add.input[1] = "proj_out"
    m.graph.node.insert(list(m.graph.node).index(add), proj)
    mi = ir.from_proto(m)
    assert annotate_conv_partitions(mi) == 3
    tags = {n.name: n.metadata_props.get("vlmforge.fusion.group") for n in mi.graph}
    assert tags["proj_conv"] is None and tags["blk_add"] == tags["blk_add_relu"] == tags["blk_b_conv"]
