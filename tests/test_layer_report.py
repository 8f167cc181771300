"""The layer-report parser on real TensorRT-RTX build logs of tiny graphs (and one literal line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.lib.trt.backend import resolve_backend
from stages.lib.trt.builder import BuildOptions, build_engine
from stages.lib.trt.layer_report import onnx_op_types, parse_layer_line, parse_layers, report_from_log
from tests import trt_probe_graphs as G

CONV = {"x": ((1, 8, 16, 16), (1, 8, 32, 32), (2, 8, 64, 64))}
MHA = {"x": ((1, 8, 64), (1, 32, 64), (2, 128, 64))}

LINE = ("Name: node_of_c_myl0_2, LayerType: correlation, Inputs: [ { Name: __mye359c_before_bias.1_16_myl0, "
        "Dimensions: [-1,8,-1,-1], Strides: [-1,1,-1,8], StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) "
        "Channel major format }], Constants: [ { Name: __mye485dconst_myl0, Dimensions: [16,8,3,3], Strides: "
        "[72,1,24,8], StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }, { Name: "
        "__mye490dconst_myl0, Dimensions: [1,16,1,1], Strides: [16,1,16,16], StrideOrder: [3,0,2,1], Datatype: "
        "Float, Format: (NHWC) Channel major format }], Outputs: [ { Name: __myln_k_arg__bb1_17_myl0, Dimensions: "
        "[-1,16,-1,-1], Strides: [-1,1,-1,16], StrideOrder: [3,0,2,1], Datatype: Float, Format: (NHWC) Channel "
        "major format }], TacticName: __myelin_CASK_STUB, StreamId: 0, Metadata: [ONNX Layer: node_of_c]"
        "[ONNX Layer: node_of_xd]")


def _log(tmp: Path, graph: Path, sm: str, profile: dict) -> list[str]:  # type: ignore[type-arg]
    be = resolve_backend("tensorrt-rtx", sm)
    return build_engine(be, graph, tmp / "e.engine", sm, profile, BuildOptions()).log


def test_parse_one_line() -> None:
    lay = parse_layer_line(LINE)
    assert (lay.name, lay.type, lay.kind) == ("node_of_c_myl0_2", "correlation", "conv")
    assert lay.inputs == ["Int8"] and lay.constants == ["Int8", "Float"] and lay.outputs == ["Float"]
    assert lay.output_names == ["__myln_k_arg__bb1_17_myl0"] and lay.onnx == ["node_of_c", "node_of_xd"]
    assert lay.precision == "Int8" and lay.tactic == "__myelin_CASK_STUB"


def test_no_layer_block_gives_empty_report() -> None:
    s = report_from_log(["[I] nothing here"])
    assert s.layers == 0 and s.low_precision_share == 0.0


@pytest.mark.parametrize("sm", ["8.6", "8.9", "12.0"])
def test_int8_conv_relu_is_one_conv_with_its_activation(tmp_path: Path, sm: str) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "int8")
    log = _log(tmp_path, g, sm, CONV)
    layers = parse_layers(log)
    assert layers[-1].output_names == ["y"]  # the block was read to its end, not past it
    s = report_from_log(log, onnx_op_types(g))
    assert s.conv_layers == 2 and s.conv_fused_activation == 2
    assert s.gemm_conv_precisions == {"Int8": 2} and s.low_precision_share == 1.0
    assert s.layer_types.get("correlation") == 2
    assert sum(s.layer_types.values()) == s.layers == len(s.per_layer)


def test_fp16_conv_relu_fuses_in_the_conv_itself(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "fp16")
    s = report_from_log(_log(tmp_path, g, "8.9", CONV), onnx_op_types(g))
    assert s.conv_fused_activation == 2 and s.gemm_conv_precisions == {"Half": 2} and s.low_precision_share == 0.0
    # without the ONNX op map, a ReLU is recognised by name only: the probe names nodes relu_*
    assert report_from_log(_log(tmp_path, g, "8.9", CONV)).conv_fused_activation == 2


def test_unfused_relu_is_not_counted(tmp_path: Path) -> None:
    # a lone conv layer: no activation in its metadata, no epilogue consuming its output
    s = report_from_log(LINE.join(["[V] Layers:\n", "\n"]))
    assert s.conv_layers == 1 and s.conv_fused_activation == 0


@pytest.mark.parametrize("mode", ["fp16", "int8", "fp8"])
def test_mha_block_is_one_fused_mha(tmp_path: Path, mode: str) -> None:
    g = G.mha_mlp(tmp_path / "mha.onnx", mode)  # type: ignore[arg-type]
    s = report_from_log(_log(tmp_path, g, "8.9", MHA), onnx_op_types(g))
    assert s.fused_mha == 1
    want = {"fp16": "Half", "int8": "Int8", "fp8": "FP8"}[mode]
    assert set(s.gemm_conv_precisions) == {want}
    assert s.low_precision_share == (0.0 if mode == "fp16" else 1.0)
    mha = [p for p in s.per_layer if p["kind"] == "mha"][0]
    assert "softmax" in " ".join(mha["onnx"])  # the Softmax ONNX node went into the MHA kernel
    assert s.softmax_nodes == s.softmax_in_mha == 1


def test_two_blocks_two_mha(tmp_path: Path) -> None:
    g = G.mha_mlp(tmp_path / "mha2.onnx", "int8", blocks=2)
    assert report_from_log(_log(tmp_path, g, "12.0", MHA)).fused_mha == 2


def _line(name: str, kind: str) -> str:
    return (f"Name: {name}, LayerType: {kind}, Inputs: [ {{ Name: a, Dimensions: [1], Datatype: Half }}], "
            f"Outputs: [ {{ Name: b, Dimensions: [1], Datatype: Half }}], TacticName: , StreamId: 0, "
            "Metadata: [ONNX Layer: n]")


def test_myelin_conv_fusions_count_as_convs_and_sync_layers_are_not_compute() -> None:
    """TensorRT-RTX's FP16 engines fuse a conv with its epilogue into a runtime_fusion named after
    it (`__myl_CorrMulAdd…`, a ConvTranspose `__myl_DecoMulAddRelu`); multi-stream engines hold
    signal/wait layers that do no math (names from the PP-OCRv4 detector's and recognizer's logs)."""
    from stages.lib.trt.layer_report import summarize

    names = [("__myl_CorrMulAddAddMaxMinMulMulMulAdd_myl0_2", "runtime_fusion"),
             ("__myl_DecoMulAddRelu_myl0_122", "runtime_fusion"), ("__myl_FcAddSilu_myl0_57", "runtime_fusion"),
             ("__myl_ReshTran_myl0_9", "runtime_fusion"), ("p2o.MatMul.2_myl0_48", "gemm"),
             ("__mye1_signal", "signal"), ("__mye2_wait", "wait"), ("__mye3", "shape_call")]
    layers = [parse_layer_line(_line(n, t)) for n, t in names]
    assert [lay.kind for lay in layers] == ["conv", "conv", "gemm", "other", "gemm", "other", "other", "other"]
    s = summarize(layers)
    assert (s.layers, s.compute_layers, s.conv_layers, s.gemm_conv_layers) == (8, 5, 2, 4)


def test_attention_blocks_counts_the_fuse_stages_mha_groups(tmp_path: Path) -> None:
    import onnx

    from stages.lib.fusion.annotate import GROUP, KIND
    from stages.lib.trt.layer_report import attention_blocks

    m = onnx.load(str(G.mha_mlp(tmp_path / "mha.onnx")))
    assert attention_blocks(tmp_path / "mha.onnx") == 0  # untagged
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Softmax"):
            for k, v in ((GROUP, "mha/0000"), (KIND, "mha")):
                n.metadata_props.add(key=k, value=v)
    onnx.save(m, tmp_path / "tagged.onnx")
    assert attention_blocks(tmp_path / "tagged.onnx") == 1
