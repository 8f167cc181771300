"""The proof on real engines: TensorRT-RTX builds on CPU for SM 8.9 from the fused graphs.

Every attention block must be one fused MHA kernel in FP16, INT8 and FP8 (the Q/DQ stage's own
placement on top of the fused graph; FP8 also with its fp8-mha pattern, which must then run the
MHA in FP8), and every Conv+ReLU one conv layer with its activation fused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx
import pytest

from tests.fusion_samples import AttnSpec, attention_model

SM = "8.9"
BLOCKS = {
    "vit_window": AttnSpec(scale="qk_sqrt_both", torchlib_kt=True, mask="window", layers=2, seq=64, head_dim=64,
                           dtype="float16"),
    "decoder_kv_gqa": AttnSpec(kv_cache=True, n_rep=2, mask="causal", softmax_fp32=True, layers=2, seq=32, past=32,
                               head_dim=64, dtype="float16"),
}


def _summary(proto: onnx.ModelProto, tmp: Path, name: str, profile: dict | None = None) -> Any:
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.layer_report import onnx_op_types, report_from_log

    path = tmp / f"{name}.onnx"
    onnx.save(proto, path)
    r = build_engine(resolve_backend("tensorrt-rtx", SM), path, tmp / f"{name}.engine", SM, profile or {},
                     BuildOptions())
    return report_from_log(r.log, onnx_op_types(path))


def _fused(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.fusion_effect import fuse

    return fuse(proto, opset)


@pytest.mark.parametrize("opset", [19, 23])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_fp16_every_attention_block_is_one_mha(tmp_path: Path, block: str, opset: int) -> None:
    spec = dataclasses.replace(BLOCKS[block], opset=opset)
    s = _summary(_fused(attention_model(spec), opset), tmp_path, block)
    assert s.fused_mha == spec.layers and s.mha_precisions == {"Half": spec.layers}


@pytest.mark.parametrize("mode,attention,mha_dtype", [("int8", "none", "Half"), ("fp8", "none", "Half"),
                                                       ("fp8", "fp8-mha", "FP8")])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_quantized_every_attention_block_is_one_mha(tmp_path: Path, block: str, mode: str, attention: str,
                                                     mha_dtype: str) -> None:
    from bench.fusion_effect import qdq
    from stages.lib.fusion.check import random_feeds

    spec = BLOCKS[block]
    m = attention_model(spec)
    q = qdq(_fused(m, spec.opset), mode, [random_feeds(m, seed=i) for i in range(2)], attention=attention)
    s = _summary(q, tmp_path, f"{block}_{mode}")
    assert s.fused_mha == spec.layers and s.mha_precisions == {mha_dtype: spec.layers}
    assert s.low_precision_share == 1.0  # every projection GEMM runs INT8/FP8


def test_fp8_mha_pattern_on_the_fused_decoder_runs_fp8(tmp_path: Path) -> None:
    """The Q/DQ stage's fp8-mha placement on the canonical pattern (scale on Q, no Casts between
    the BMMs) gives one FP8 MHA kernel per block. (Before its matcher looked through precision
    Casts, the unfused export kept these MHAs in FP16; the canonical form does not depend on that.)"""
    from bench.fusion_effect import qdq
    from stages.lib.fusion.check import random_feeds

    spec = dataclasses.replace(BLOCKS["decoder_kv_gqa"], upcast_at="bmm")  # as the real exports write it
    m = attention_model(spec)
    feeds = [random_feeds(m, seed=i) for i in range(2)]
    on = _summary(qdq(_fused(m, spec.opset), "fp8", feeds, attention="fp8-mha"), tmp_path, "on")
    assert on.fused_mha == 2 and on.mha_precisions == {"FP8": 2}


@pytest.mark.slow
def test_resnet_every_conv_relu_is_one_conv_layer(tmp_path: Path) -> None:
    import numpy as np

    from bench.fusion_effect import qdq
    from stages.lib.export.cnn import export_cnn, generate_tiny_cnn

    ck = generate_tiny_cnn(tmp_path / "ck", seed=0)
    export_cnn(ck, tmp_path / "v", {"dtype": "fp16", "opset": 19})
    m = onnx.load(str(tmp_path / "v" / "vision.onnx"))
    relus = sum(n.op_type == "Relu" for n in m.graph.node)
    prof = {"pixel_values": ((1, 3, 56, 56), (1, 3, 224, 224), (2, 3, 448, 448))}
    off = _summary(m, tmp_path, "off", prof)
    fused = _fused(m, 19)
    on = _summary(fused, tmp_path, "on", prof)
    assert on.conv_layers == 20 and on.conv_fused_activation == relus == 17
    # TensorRT-RTX also fuses an unfolded Conv+BN+ReLU into one `runtime_fusion` (__myl_CorrMulAdd…,
    # 16 of 17 here), but the folded graph's engine is still the shorter one (26 layers vs 37)
    assert on.layers < off.layers and off.conv_layers == 20
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float16)} for _ in range(2)]
    for mode in ("int8", "fp8"):
        s = _summary(qdq(fused, mode, feeds), tmp_path, mode, prof)
        assert s.conv_layers == 20 and s.conv_fused_activation >= relus, (mode, s.conv_fused_activation)


@pytest.mark.slow
def test_default_config_every_attention_block_is_one_mha(tmp_path: Path) -> None:
    """The default config's real Qwen exports (run by the real export stages), fused, then
    FP16 / INT8 / FP8 (Q/DQ on the projections): one fused MHA per attention block each time."""
    from bench.fusion_effect import qdq, real_graphs

    root = Path(__file__).resolve().parents[1]
    graphs = real_graphs(root / "configs" / "default.yaml", tmp_path / "real")
    assert [g[0].split(":")[1] for g in graphs] == ["vision", "decoder"]
    for name, m, _, opset, prof, feeds in graphs:
        blocks = sum(n.op_type == "Softmax" for n in m.graph.node)
        fused = _fused(m, opset)
        assert sum(n.op_type == "Softmax" for n in fused.graph.node) == blocks  # canonical at opset 19
        for mode in ("fp16", "int8", "fp8"):
            proto = fused if mode == "fp16" else qdq(fused, mode, feeds)
            s = _summary(proto, tmp_path, f"{name.replace(':', '_')}_{mode}", prof)
            assert s.fused_mha == blocks, (name, mode, s.fused_mha, blocks)
            if mode != "fp16":
                assert s.low_precision_share >= 0.9, (name, mode, s.gemm_conv_precisions)
