"""The dtype name tables, one of each: config names (``fp32``/``fp16``/``bf16``), ORT type strings,
ONNX element types, TensorRT type names, safetensors codes, Q/DQ storage types, numpy and torch.
numpy only at import: the device runtime (no torch, no onnx, maybe no ml_dtypes) imports this;
the functions that need onnx, torch or ml_dtypes import them when called."""

from __future__ import annotations

from typing import Any

import numpy as np

# config dtype name -> the numpy / torch / onnx-ir name of the same type
CONFIG_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# config dtype name -> numpy dtype of host arrays for such a graph (numpy has no bfloat16)
CONFIG_NUMPY = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}
# precisions that are a float dtype, not a quantization mode: such a graph has no Q/DQ
UNQUANTIZED = tuple(CONFIG_DTYPES)

# ORT ``NodeArg.type`` string -> numpy dtype
ORT_FLOATS: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
ORT_NUMPY: dict[str, Any] = {**ORT_FLOATS, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
ORT_TYPES = {np.dtype(v): k for k, v in ORT_NUMPY.items()}  # numpy dtype -> ORT type string
# An FP8 graph input or output (a quantized KV cache) lives on the host as its bit patterns in
# uint8: what onnxruntime's Python binding returns for FP8 outputs and TensorRT's buffers hold.
# Nothing on the host computes with them; they go back in as the next call's past.
# (``ortsession`` wraps such a feed in an OrtValue of the FP8 type: ORT takes no FP8 numpy array.)
FP8_BITS = {"tensor(float8e4m3fn)": np.uint8, "tensor(float8e5m2)": np.uint8}
ORT_NUMPY.update(FP8_BITS)  # after ORT_TYPES: a uint8 array still names tensor(uint8)

# ONNX ``TensorProto`` element type -> the name of the graph's own dtype, as numpy / ml_dtypes
# spell it (what an io spec records: BFLOAT16 is "bfloat16")
ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
    17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4",
}
# ONNX element type -> numpy dtype name of host arrays fed to / read from it. BFLOAT16 as float32:
# numpy has none, and ORT's Python binding takes no bfloat16 array (not even ml_dtypes')
ONNX_NUMPY = {**{t: ONNX_DTYPES[t] for t in (1, 10, 11, 6, 7, 9)}, 16: "float32"}
# ONNX element type of a Q/DQ's codes -> the low precision it is (UINT8/INT8, UINT4/INT4, the FP8s)
ONNX_LOW_PRECISION = {2: "int8", 3: "int8", 21: "int4", 22: "int4", 17: "fp8", 18: "fp8", 19: "fp8", 20: "fp8"}

# TensorRT ``DataType`` name -> numpy dtype (where a TensorRT build has no ``nptype``)
TRT_NUMPY: dict[str, Any] = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                             "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8, "FP8": np.uint8}  # FP8: bits

# safetensors header dtype -> (torch dtype attribute, bytes per element)
SAFETENSORS: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}

# Q/DQ storage type (``qdq.rules.ModeRules.qtype``) -> numpy / ml_dtypes dtype name of its codes
QTYPES = {"int8": "int8", "float8e4m3fn": "float8_e4m3fn", "int4": "int4"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a config dtype name (``fp16`` -> ``torch.float16``)."""
    import torch

    return getattr(torch, CONFIG_DTYPES[name])


def torch_of_safetensors(code: str) -> Any:
    """The torch dtype of a safetensors header dtype (``BF16`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, SAFETENSORS[code][0])


def ort_type(elem_type: int) -> str:
    """The ORT type string (``NodeArg.type``) of an ONNX element type: 10 -> ``tensor(float16)``."""
    import onnx

    return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"


def qtype_numpy(qtype: str) -> np.dtype[Any]:
    """The dtype of a Q/DQ storage type's codes (ml_dtypes for FP8 and INT4: numpy has neither)."""
    import ml_dtypes

    if qtype not in QTYPES:
        raise ValueError(f"unknown storage type {qtype}")
    return np.dtype(getattr(ml_dtypes, QTYPES[qtype], None) or QTYPES[qtype])
