"""The dtype name tables, one of each: config names (``fp32``/``fp16``/``bf16``), ORT type strings,
ONNX element types, numpy and torch. numpy only at import (a device runtime imports this)."""

from __future__ import annotations

from typing import Any

import numpy as np

# config dtype name -> the numpy / torch / onnx-ir name of the same type
CONFIG_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# config dtype name -> numpy dtype of host arrays for such a graph (numpy has no bfloat16)
CONFIG_NUMPY = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}

# ORT ``NodeArg.type`` string -> numpy dtype
ORT_FLOATS: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
ORT_NUMPY: dict[str, Any] = {**ORT_FLOATS, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

# ONNX ``TensorProto`` element type -> numpy dtype name (BFLOAT16 fed as float32: numpy has none)
ONNX_NUMPY = {1: "float32", 10: "float16", 11: "float64", 16: "float32", 6: "int32", 7: "int64", 9: "bool"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a config dtype name (``fp16`` -> ``torch.float16``)."""
    import torch

    return getattr(torch, CONFIG_DTYPES[name])
