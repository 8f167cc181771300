"""Weights that stream: read a chunk of rows at a time, and written the same way when saved.

A 16 GB graph cannot be quantized by reading each weight whole and keeping its codes in memory
until the save. Here a weight is row access (``Rows``: read from its external file a range at a
time, computed, or sliced), and a new initializer can be an ``ir.LazyTensor`` (``lazy_const``
over ``Deferred``) whose bytes are computed again from the source rows when the model is saved,
chunk by chunk: never more than one chunk of one weight in memory. The Q/DQ passes (``insert``,
``int4``, ``awq``) build their quantized and rescaled weights this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

CHUNK_BYTES = 16 * 2**20  # float32 bytes of one chunk of rows; a few temporaries of it are the working set


def register_initializer(graph: ir.Graph, name: str, make: Callable[[str], Any]) -> ir.Value:
    """A new initializer named ``name`` (``name_1``, ``name_2``, ... when taken) holding
    ``make(final name)``: in memory or lazy, whatever ``make`` builds."""
    import onnx_ir as ir

    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    t = make(name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(list(t.shape)))
    v.type = ir.TensorType(t.dtype)
    graph.register_initializer(v)
    return v


@dataclass(frozen=True)
class Rows:
    """A tensor read, or computed, along its first axis: ``get(r0, r1)`` gives rows r0:r1."""

    shape: tuple[int, ...]
    dtype: Any  # numpy dtype
    get: Callable[[int, int], np.ndarray]

    def chunks(self, multiple: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """(r0, r1, rows) in steps of a multiple of ``multiple`` rows, about CHUNK_BYTES as float32."""
        if not self.shape:
            yield 0, 1, self.get(0, 1)
            return
        step = max(multiple, CHUNK_BYTES // (4 * max(1, math.prod(self.shape[1:]))) // multiple * multiple)
        for r0 in range(0, self.shape[0], step):
            r1 = min(r0 + step, self.shape[0])
            yield r0, r1, self.get(r0, r1)

    def map(self, fn: Callable[[int, int, np.ndarray], np.ndarray], dtype: Any) -> Rows:
        """Rows computed from these rows (codes from weights, scaled weights)."""
        return Rows(self.shape, np.dtype(dtype), lambda r0, r1: fn(r0, r1, self.get(r0, r1)))


def rows_of(t: Any) -> Rows:
    """Row access to a weight: an external one is read from its file a range at a time, a
    ``Deferred`` one computed, an in-memory one sliced."""
    import onnx_ir as ir

    if isinstance(t, ir.LazyTensor) and isinstance(t.raw, Deferred):
        return t.raw.rows
    shape = tuple(int(x) for x in t.shape.numpy())
    dt = np.dtype(t.dtype.numpy())
    if isinstance(t, ir.ExternalTensor) and t.dtype.bitwidth >= 8 and shape:
        row = math.prod(shape[1:])

        def read(r0: int, r1: int) -> np.ndarray:
            off = (t.offset or 0) + r0 * row * dt.itemsize
            return np.fromfile(t.path, dtype=dt, count=(r1 - r0) * row, offset=off).reshape((r1 - r0, *shape[1:]))

        return Rows(shape, dt, read)
    arr = t.numpy()
    return Rows(shape, dt, (lambda r0, r1: arr) if not shape else (lambda r0, r1: arr[r0:r1]))


class Deferred:
    """A ``LazyTensor``'s function and what it evaluates to (itself, so ``rows_of`` finds the
    rows): the whole array on ``numpy()``, chunk by chunk on ``tofile`` (onnx-ir's external-data
    writer calls it, one tensor at a time). ``multiple`` keeps INT4 chunks whole bytes."""

    def __init__(self, rows: Rows, multiple: int = 1):
        self.rows, self.multiple = rows, multiple

    def __call__(self) -> Deferred:
        return self

    def numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self.rows.get(0, self.rows.shape[0] if self.rows.shape else 1))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def tobytes(self) -> bytes:
        import onnx_ir as ir

        return ir.tensor(self.numpy()).tobytes()

    def tofile(self, file: Any) -> None:
        import onnx_ir as ir

        for _, _, chunk in self.rows.chunks(self.multiple):
            file.write(ir.tensor(np.ascontiguousarray(chunk)).tobytes())


def lazy_const(graph: ir.Graph, name: str, rows: Rows, multiple: int = 1) -> ir.Value:
    """An initializer whose bytes are ``rows``, computed when the model is saved (or read)."""
    import onnx_ir as ir

    d: Any = Deferred(rows, multiple)  # duck-typed: LazyTensor only calls numpy/tobytes/tofile on it
    dtype = ir.DataType.from_numpy(rows.dtype)
    return register_initializer(graph, name, lambda n: ir.LazyTensor(d, dtype, ir.Shape(list(rows.shape)), name=n))
