"""A decoder-like chain with external data and a cut list, for the streaming quantize tests
(tests/test_quantize_streaming_*.py): ``decoder_chain`` writes it weight by weight,
``chain_feeds`` feeds it, ``calibrate`` gives it the calibrate stage's ranges; ``_ctx``, ``GQ``
and ``_GATES`` are what the quantize stage is called with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from pipeline.stage import StageContext
from stages.lib.qdq import graphio
from stages.lib.qdq.recipe import Calib
from stages.lib.segments import runner as segments
from stages.lib.segments.cuts import CUTS_KEY, SCOPES_KEY


def _default_gates() -> dict[str, Any]:
    """The gates the config gives every quantized precision (params carry them, the stage reads them)."""
    from pipeline.config import BuildConfig

    cfg = BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                      "targets": ["rtx4090"]})
    return {p: g.model_dump(mode="json") for p, g in cfg.gates.items()}


_GATES = _default_gates()


def decoder_chain(folder: Path, layers: int, hidden: int, vocab: int = 256, seed: int = 0,
                  scope: str = "layers") -> Path:
    """``inputs_embeds`` -> layers x [Mul(gamma) -> up MatMul -> Relu -> down MatMul -> + residual]
    -> lm_head MatMul -> ``logits``, FP16, cut after every layer (``vlmforge.segment_cuts``). The
    weights are written one at a time into ``decoder.onnx.data``, never all in memory.
    ``scope="blocks"``: a vision tower's layout instead, ``blocks.N`` name scopes on every node
    (as torch.onnx writes them) and no recorded cuts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits, nodes, cuts, x, offset = [], [], [], "inputs_embeds", 0
    with open(folder / "decoder.onnx.data", "wb") as f:
        def put(name: str, arr: np.ndarray) -> None:
            nonlocal offset
            f.write(arr.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(arr.shape),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", "decoder.onnx.data"), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            offset += arr.nbytes
            f.write(b"\0" * (-offset % 4096))
            offset += -offset % 4096

        for i in range(layers):
            put(f"gamma{i}", (1 + 0.2 * rng.standard_normal(hidden)).astype(np.float16))
            for w in ("up", "down"):
                put(f"{w}{i}", (rng.standard_normal((hidden, hidden), np.float32) / np.sqrt(hidden)).astype(np.float16))
            s = f"/model/{scope}.{i}"
            block = [helper.make_node("Mul", [x, f"gamma{i}"], [f"h{i}"], name=f"{s}/norm/Mul"),
                     helper.make_node("MatMul", [f"h{i}", f"up{i}"], [f"u{i}"], name=f"{s}/mlp/up_proj/MatMul"),
                     helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"{s}/mlp/act"),
                     helper.make_node("MatMul", [f"r{i}", f"down{i}"], [f"d{i}"], name=f"{s}/mlp/down_proj/MatMul"),
                     helper.make_node("Add", [f"d{i}", x], [f"x{i + 1}"], name=f"{s}/residual")]
            for n in block if scope != "layers" else []:
                n.metadata_props.add(key=SCOPES_KEY, value=repr(["", f"model.{scope}.{i}", f"model.{scope}.{i}.mlp",
                                                                   n.op_type.lower()]))
            nodes += block
            x = f"x{i + 1}"
            cuts.append(x)
        put("lm_head", (rng.standard_normal((hidden, vocab), np.float32) / np.sqrt(hidden)).astype(np.float16))
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"], name="/lm_head/MatMul"))
    g = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16,
                                                                           ["batch", "seq", hidden])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    if scope == "layers":
        m.metadata_props.add(key=CUTS_KEY, value=json.dumps(cuts))
    onnx.save_model(m, str(folder / "decoder.onnx"))
    return folder / "decoder.onnx"


def chain_feeds(hidden: int, n: int = 2, seq: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"inputs_embeds": rng.standard_normal((1, seq, hidden)).astype(np.float16)} for _ in range(n)]


def calibrate(path: Path, feeds: list[dict[str, np.ndarray]], out: Path) -> Calib:
    """ranges_decoder.json/.npz as the calibrate stage writes them (its segmented collector)."""
    from stages.lib.qdq import calibrators as C

    col = C.collector(ir.from_proto(graphio.load_proto(path, in_file=True)))
    segments.run_segmented(path, feeds, lambda seg, i, v: col.update(v, count=seg.index == 0), expose=col.names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranges_decoder.json").write_text(json.dumps({"order": col.names, "tensors": col.ranges("max")}))
    np.savez(out / "ranges_decoder.npz", **col.arrays())  # type: ignore[arg-type]
    return Calib.load(out / "ranges_decoder.json")


def _ctx(fuse: Path, cal: Path, out: Path) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext("quantize@t", {"gates": _GATES}, {"fuse": fuse, "calibrate": cal}, out, None, [])


GQ = {"keep_high_precision": [], "int4_block": 128, "attention": "none", "accuracy_budget": None}
