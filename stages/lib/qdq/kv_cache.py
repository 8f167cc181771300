"""KV-cache precision (``precision.kv_cache``): the decoder's past and present in INT8 or FP8.

The cache is the decoder's I/O, not a weight: each ``past_key_values.<i>.key|value`` input
becomes an INT8 / FLOAT8E4M3FN tensor behind a DequantizeLinear, and each ``present.<i>.*``
output the QuantizeLinear of what the layer concatenated. Attention reads the dequantized FP16
values; what shrinks is what a runtime keeps between steps (half of an FP16 cache), which is
what bounds batch x context on a 24 GB card. The past, dequantized and concatenated, is
quantized again with its own scale, which returns its codes unchanged (x / s * s / s rounds to
the same code), so a step never re-rounds the cache it read.

Scales are per layer, per K and V, per tensor (symmetric, zero point 0: what TensorRT takes on
I/O): the largest |value| the calibration prompts' present tensors reached (``calibrate`` records
``present.*`` in ``ranges_decoder.json``) over the type's largest code. A cache is never
clipped below what calibration saw: a clipped key moves every later attention score.

Measured with TensorRT-RTX 1.7 on a micro graph (DQ(past) -> Concat -> Q(present)): INT8 (SM
8.6) and FP8 (SM 8.9) I/O build, the engine's I/O tensors are int8 / fp8, and the concat runs in
the cache's type. onnxruntime's CPU kernels run both (FP8 inputs as OrtValues: ``ortsession``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir  # the stage imports this module inside its run: onnx-ir is quantize's toolchain

__all__ = ["KV_DTYPES", "PAST", "PRESENT", "KvCache", "QuantizeKvCachePass", "apply", "cache_bytes", "kv_pairs",
           "kv_precision", "scales_from_ranges"]

KvPrecision = Literal["int8", "fp8"]
PAST, PRESENT = "past_key_values.", "present."
QMAX = {"int8": 127.0, "fp8": 448.0}  # largest code magnitude: scale = amax / qmax
# ONNX element type of each precision's cache (INT8, FLOAT8E4M3FN): one byte per element
KV_DTYPES = {"int8": 3, "fp8": 17}
META = "vlmforge.kv_cache"  # metadata on the decoder graph: the cache precision it was given


def kv_pairs(names_in: list[str], names_out: list[str]) -> list[tuple[str, str]]:
    """(past input, present output) per layer and kind, in layer order; ValueError when a past has
    no present (a decoder exported without its cache outputs cannot take a quantized cache)."""
    pasts = [n for n in names_in if n.startswith(PAST)]
    outs = set(names_out)
    pairs = []
    for p in sorted(pasts, key=lambda n: (int(n[len(PAST):].split(".")[0]), n)):
        present = PRESENT + p[len(PAST):]
        if present not in outs:
            raise ValueError(f"decoder input {p} has no output {present}")
        pairs.append((p, present))
    return pairs


def scales_from_ranges(ranges: dict[str, Any], precision: KvPrecision, source: str) -> dict[str, float]:
    """present output name -> its scale, from ``ranges_decoder.json``'s ``max_abs``."""
    tensors = ranges.get("tensors") or {}
    got = {n: float(t["max_abs"]) for n, t in tensors.items() if n.startswith(PRESENT)}
    if not got:
        raise ValueError(f"{source} has no present.* ranges (written by an older calibrate stage): "
                         "rebuild the calibrate stage")
    # an all-zero tensor (a padded head) still needs a positive scale: any one reproduces its zeros
    return {n: (a if a > 0 else 1.0) / QMAX[precision] for n, a in got.items()}


@dataclass(frozen=True)
class KvCache:
    """What the report says about a cache: its precision and the bytes it takes."""

    precision: str
    layers: int
    bytes_per_token: int  # K and V of every layer, for one sequence
    bytes_per_token_fp16: int
    scales: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "layers": self.layers, "bytes_per_token": self.bytes_per_token,
                "bytes_per_token_fp16": self.bytes_per_token_fp16,
                "mib_per_4k_tokens": round(4096 * self.bytes_per_token / 2**20, 3),
                "saving_vs_fp16": round(1 - self.bytes_per_token / self.bytes_per_token_fp16, 4), "scales": self.scales}


def cache_bytes(pairs: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one token adds to the cache: ``pairs`` K/V tensors of [kv_heads, head_dim]."""
    return pairs * kv_heads * head_dim * itemsize


def kv_precision(model: ir.Model) -> str | None:
    """The cache precision a decoder graph was given (None: its cache is in the graph's float type)."""
    return model.metadata_props.get(META)


def _const(name: str, arr: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))


class QuantizeKvCachePass(ir.passes.InPlacePass):
    """The cache I/O of a decoder graph in ``precision``, with ``scales`` per present output.

    Weights are untouched: on a decoder loaded without its external data this edits the
    structure only, so the pass costs nothing at 8 B."""

    def __init__(self, precision: KvPrecision, scales: dict[str, float]):
        super().__init__()
        self.precision, self.scales = precision, scales

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from stages.lib.dtypes import qtype_numpy

        g = model.graph
        if kv_precision(model) is not None:
            raise ValueError(f"the decoder's cache is already {kv_precision(model)}")
        ins = {str(v.name): v for v in g.inputs}
        outs = {str(v.name): v for v in g.outputs}
        pairs = kv_pairs(list(ins), list(outs))
        missing = [pr for _, pr in pairs if pr not in self.scales]
        if missing:
            raise ValueError(f"no calibrated range for {missing[0]}")
        qtype = {"int8": "int8", "fp8": "float8e4m3fn"}[self.precision]
        elem = ir.DataType(KV_DTYPES[self.precision])
        order = {id(n): i for i, n in enumerate(g)}
        for past_name, present_name in pairs:
            past, present = ins[past_name], outs[present_name]
            fdt = past.dtype.numpy() if past.dtype is not None else np.float16
            tag = past_name[len(PAST):]
            s = _const(f"kv_scale.{tag}", np.asarray(self.scales[present_name], dtype=fdt))
            zp = _const(f"kv_zero.{tag}", np.zeros((), dtype=qtype_numpy(qtype)))
            g.initializers.add(s)
            g.initializers.add(zp)
            # the input keeps its name, in the cache's type; its readers read the DQ's FP16 output
            readers = list(past.uses())
            codes = ir.Value(name=past_name, shape=past.shape, type=ir.TensorType(elem))
            past.name = f"{past_name}_fp"
            g.inputs[g.inputs.index(past)] = codes
            dq = ir.Node("", "DequantizeLinear", [codes, s, zp], name=f"kv_dq.{tag}", num_outputs=1)
            dq.outputs[0].name, dq.outputs[0].shape = f"{past_name}_dequantized", past.shape
            dq.outputs[0].type = past.type
            for use in readers:
                use.node.replace_input_with(use.idx, dq.outputs[0])
            first = min((u.node for u in readers), key=lambda n: order.get(id(n), 0), default=None)
            if first is not None:
                g.insert_before(first, dq)
            else:
                g.append(dq)
            # the output keeps its name: the Q of the layer's concatenated FP16 cache
            present.name = f"{present_name}_fp"
            q = ir.Node("", "QuantizeLinear", [present, s, zp], name=f"kv_q.{tag}", num_outputs=1)
            q.outputs[0].name, q.outputs[0].shape = present_name, present.shape
            q.outputs[0].type = ir.TensorType(elem)
            g.outputs[g.outputs.index(present)] = q.outputs[0]
            producer = present.producer()
            if producer is not None:
                g.insert_after(producer, q)
            else:  # a present that is a graph input passed through (no new tokens): Q it first
                g.insert_before(dq, q)
        model.metadata_props[META] = self.precision
        return ir.passes.PassResult(model, modified=bool(pairs))


def apply(path: Path, ranges_path: Path, precision: str) -> KvCache:
    """Give the decoder graph at ``path`` its cache ``precision`` (in place, atomically: the file
    is replaced whole), with scales from ``ranges_path``; "fp16" (the graph's own float type)
    changes nothing. Only the structure is read and written: the weights stay in their file."""
    import json
    import os

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    pasts = [v for v in proto.graph.input if v.name.startswith(PAST)]
    if not pasts:
        raise ValueError(f"{path.name} has no past_key_values inputs: no cache")
    first = pasts[0].type.tensor_type
    dims = [d.dim_value for d in first.shape.dim]
    kv_heads, head_dim, fp_bytes = dims[1], dims[3], 2 if first.elem_type != 1 else 4
    scales: dict[str, float] = {}
    pairs: list[Any] = pasts  # in the graph's float type, the cache needs no present to be counted
    if precision not in ("fp16", "fp32", "bf16"):
        pairs = kv_pairs([v.name for v in pasts], [v.name for v in proto.graph.output])
        p: KvPrecision = "fp8" if precision == "fp8" else "int8"
        scales = scales_from_ranges(json.loads(ranges_path.read_text()), p, str(ranges_path))
        model = ir.from_proto(proto)
        del proto
        QuantizeKvCachePass(p, scales)(model)
        tmp = path.with_name(f".{path.name}.kv")
        onnx.save(ir.to_proto(model), str(tmp))
        os.replace(tmp, path)
    item = 1 if scales else fp_bytes
    return KvCache(precision if scales else {2: "fp16", 4: "fp32"}[fp_bytes], len(pairs) // 2,
                   cache_bytes(len(pairs), kv_heads, head_dim, item), cache_bytes(len(pairs), kv_heads, head_dim, 2),
                   scales={k: float(v) for k, v in scales.items()})
