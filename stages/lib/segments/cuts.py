"""Where a decoder graph may be cut into blocks: the one record every stage shares.

A big decoder graph cannot run whole in onnxruntime on a 24 GB machine (a session over an FP16
graph holds ~2x its weights, and grows per run). It can run block by block: the residual stream
after each transformer layer separates the graph, so a runner can execute one layer's nodes at a
time on the previous block's activations. The exporter knows those values exactly; it records
them in the model's ``metadata_props`` under ``CUTS_KEY`` (JSON list of value names, in layer
order), rewrites (fuse, Q/DQ) keep model metadata and value names of the residual stream, and
the runners (calibration, parity) read them back here.

``cuts_from_name_scopes`` derives the same list from the module paths torch.onnx's dynamo
exporter writes on every node (``pkg.torch.onnx.name_scopes``).
"""

from __future__ import annotations

import ast
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["CUTS_KEY", "SCOPES_KEY", "cuts_from_name_scopes", "layer_of", "read_cuts", "write_cuts"]

CUTS_KEY = "vlmforge.segment_cuts"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# the module list a block's scope ends in: decoder layers, or a vision tower's blocks
_SCOPE = {word: re.compile(rf"(?:^|\.){word}\.(\d+)$") for word in ("layers", "blocks")}


def layer_of(node: ir.Node, scope: str = "layers") -> int | None:
    """The block index a node was exported from (its innermost ``<scope>.N`` module: decoder
    ``layers``, or a vision tower's ``blocks``)."""
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return None
    try:  # torch writes the Python repr of a list of strings
        scopes = ast.literal_eval(raw) if raw.startswith("[") else raw.split(",")
    except (ValueError, SyntaxError):
        return None
    pattern = _SCOPE[scope]
    for name in reversed(scopes):
        m = pattern.search(str(name).strip())
        if m:
            return int(m.group(1))
    return None


def cuts_from_name_scopes(model: ir.Model, scope: str = "layers") -> list[str]:
    """Residual-stream value after each layer (``scope``: "blocks" for a vision tower), in layer
    order; [] when the graph has no such scopes.

    The exporter's optimiser shares small values across layers (shape tensors, the rotary
    cos/sin unsqueezes live in layer 0's scope and feed every layer), so several values leave a
    layer; the residual stream is the one the layer's last such node (in graph order) produces.
    """
    graph = model.graph
    outputs = {v.name for v in graph.outputs}
    last: dict[int, str] = {}
    for node in graph:  # graph order is topological: the later producer overwrites
        layer = layer_of(node, scope)
        if layer is None:
            continue
        for v in node.outputs:
            if v.name not in outputs and any(layer_of(user, scope) != layer for user, _ in v.uses()):
                last[layer] = str(v.name)
    layers = sorted(last)
    return [last[i] for i in layers] if layers == list(range(len(layers))) else []


def read_cuts(model: ir.Model | Any) -> list[str]:
    """The recorded cut list of an onnx-ir model or ModelProto ([] if none)."""
    props: Any = model.metadata_props
    if isinstance(props, dict):  # onnx-ir
        raw = props.get(CUTS_KEY)
    else:  # onnx.ModelProto: a repeated StringStringEntryProto
        raw = next((p.value for p in props if p.key == CUTS_KEY), None)
    if not raw:
        return []
    names = json.loads(raw)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{CUTS_KEY} must be a JSON list of value names, got {raw[:80]!r}")
    return names


def write_cuts(model: ir.Model, names: list[str]) -> None:
    model.metadata_props[CUTS_KEY] = json.dumps(list(names))
