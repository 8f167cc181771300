"""Every tensor an ONNX model holds, wherever it lives, and how many bytes it is.

Protobuf cannot size or serialize a message past 2 GB (it raises EncodeError), so whether a
graph may be handled as one in-memory proto is decided here, before anyone tries: tensors are
found in initializers, Constant/attribute tensors, sparse tensors, subgraphs and functions, in
memory or in an external data file, and sized from dims x element width, never from
``ByteSize()``. Both representations the passes use are covered: ``onnx.ModelProto`` and
``onnx_ir.Model``. The loaders and runners (``graphio``, ``segments``) act on
these answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

# Sizes come from the tensors (dims x element width), never from ``ByteSize()``: protobuf
# raises EncodeError when asked to size or serialize a message past 2 GB.
PROTO_LIMIT = 2**31 - 2**26  # tensor bytes one in-memory proto may carry (64 MiB left for the graph)


def tensor_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Bytes of every tensor the model holds (initializers, Constant/attribute tensors, subgraphs,
    functions), in memory or external, computed from dims and element types."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return sum(proto_tensor_bytes(t) for t in proto_tensors(model))
    return sum(_ir_tensor_bytes(t) for _, t in ir_tensors(model))


def fits_in_proto(model: ir.Model | onnx.ModelProto) -> bool:
    """True when the model can be serialized as one protobuf message (its tensors inline)."""
    return tensor_bytes(model) < PROTO_LIMIT


def proto_tensor_bytes(t: onnx.TensorProto) -> int:
    import math

    import onnx_ir as ir

    if t.data_type == ir.DataType.STRING:
        return sum(len(x) for x in t.string_data)
    try:
        return math.ceil(math.prod(t.dims) * ir.DataType(t.data_type).bitwidth / 8)
    except (TypeError, ValueError):  # UNDEFINED / unknown element type: it holds no data we size
        return 0


def proto_tensors(model: onnx.ModelProto) -> Any:
    def attrs(nodes: Any) -> Any:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for sp in [a.sparse_tensor] if a.HasField("sparse_tensor") else []:
                    yield from (sp.values, sp.indices)
                for sp in a.sparse_tensors:
                    yield from (sp.values, sp.indices)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from graph(g)

    def graph(g: Any) -> Any:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from (sp.values, sp.indices)
        yield from attrs(g.node)

    yield from graph(model.graph)
    for f in model.functions:
        yield from attrs(f.node)


def _ir_tensor_bytes(t: Any) -> int:
    try:
        return int(t.nbytes)
    except TypeError:  # STRING tensors have no element width
        return sum(len(x) for x in t.numpy().ravel())


def ir_tensors(model: ir.Model) -> Any:
    """(where, tensor) for every tensor of the model: where is an ir.Value (an initializer) or
    (node, attribute name, index or None) for a tensor attribute."""
    import onnx_ir as ir

    for g in model.graphs():
        for v in g.initializers.values():
            if v.const_value is not None:
                yield v, v.const_value
    nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
    for f in model.functions.values():
        nodes += list(ir.traversal.RecursiveGraphIterator(f))
    for node in nodes:
        for name, a in node.attributes.items():
            if a.is_ref() or a.value is None:
                continue
            if a.type == ir.AttributeType.TENSOR:
                yield (node, name, None), a.value
            elif a.type == ir.AttributeType.TENSORS:
                for i, t in enumerate(a.value):
                    yield (node, name, i), t


def has_external(model: ir.Model | onnx.ModelProto) -> bool:
    """True when some tensor of the model lives in an external data file."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto_tensors(model))
    return any(isinstance(t, ir.ExternalTensor) for _, t in ir_tensors(model))
