"""Decoder export that costs the same at any depth: trace a few layers, stamp the rest.

Tracing the whole decoder (``decoder_export.export_decoder_graph``) grows with depth: a
36-layer checkpoint took 150-260 s and the optimiser's folded copies pushed a 1.43B model to
6.4x its weight bytes. Every layer after the first few is the same graph with other weights,
so here:

1. a K-layer template (``decoder_load.template_decoder``: random values, so each initializer
   is one parameter, and a small vocab) is traced with the usual exporter;
   K = deepstack layers + 2 (at least 2), so the template's last layer is a plain layer: layer
   0 holds the values the optimiser shares between layers (shape Concats, rotary unsqueezes),
   and Qwen3-VL adds deepstack maps after layers 0..2;
2. the template's last layer (``stamp_layers``) is cloned for layers K..L-1, chained on the
   residual stream (``segment_cuts``), with its own past/present I/O and initializers;
3. every parameter initializer is bound to its checkpoint tensor (``lazy_weights.bind_weights``:
   an ``ir.LazyTensor`` per tensor), and ``ir.save`` reads them one at a time.

No real weight is ever held in memory beyond the one tensor being written.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import StageError
from stages.lib.export.lazy_weights import param_pattern
from stages.lib.export.stamp_clone import clone_node

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["TEMPLATE_VOCAB", "export_stamped", "name_initializers", "stamp_blocker", "stamp_layers",
           "template_layers"]

# The template's vocab: it only sizes lm_head, which is bound to the real table afterwards. Small
# keeps the traced lm_head (and its folded transpose) from costing 2x vocab x hidden in the trace.
TEMPLATE_VOCAB = 64
_SUBGRAPH = "stamped export: node {node} has a subgraph; use decoder_export: trace"


def template_layers(n_layers: int, n_deepstack: int) -> int:
    """K: the template's depth (all of the decoder when it is not deeper)."""
    return min(n_layers, max(2, n_deepstack + 2))


def stamp_blocker(text_config: Any, n_deepstack: int) -> str | None:
    """Why the layers past the template are not all copies of its last one (None: they are).

    A Qwen2 config with ``use_sliding_window`` gives layers from ``max_window_layers`` on
    another attention (``layer_types``); released Qwen-VL checkpoints use full attention only.
    """
    n = int(text_config.num_hidden_layers)
    kinds = list(getattr(text_config, "layer_types", None) or [])[template_layers(n, n_deepstack) - 1:]
    if len(set(kinds)) > 1:
        return f"the text layers are not all alike (layer_types {sorted(set(kinds))})"
    return None


def _graph_path(name: str) -> str:
    """A model parameter name as the export wrapper (and so the graph) names it."""
    prefix = "model.language_model."
    return "text_model." + name[len(prefix):] if name.startswith(prefix) else name


def _key(dtype: Any, shape: Any, raw: bytes) -> tuple[Any, tuple[int, ...], bytes]:
    return dtype, tuple(int(d) for d in shape), hashlib.blake2b(raw, digest_size=16).digest()


def _torch_key(t: Any) -> tuple[Any, tuple[int, ...], bytes]:
    from onnx_ir.tensor_adapters import TorchTensor

    tensor = TorchTensor(t.detach().contiguous())
    return _key(tensor.dtype, tensor.shape, tensor.tobytes())


def name_initializers(graph: ir.Graph, template: Any) -> set[str]:
    """Rename each parameter's initializer to its graph path (``text_model.layers.1.mlp.up_proj.weight``,
    ``..._t`` for a folded transpose); return the parameter names, layer index as ``layers.#.``.

    Matched by value: the template's parameters are distinct random tensors, so equal bytes mean
    that parameter. A float initializer of >= 16 elements that matches none would be a weight
    the optimiser derived (a folded Cast, a scaled copy): it could not be bound, so it is refused.
    """
    by_value: dict[tuple[Any, tuple[int, ...], bytes], str] = {}
    for name, p in template.named_parameters(remove_duplicate=False):  # tied lm_head comes last: wins
        path = _graph_path(name)
        by_value[_torch_key(p)] = path
        if p.dim() == 2:
            by_value[_torch_key(p.t())] = path + "_t"
    buffers = {_torch_key(b) for b in template.buffers()}
    params: set[str] = set()
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        key = _key(tensor.dtype, tensor.shape, tensor.tobytes())
        found = by_value.get(key)
        if found is None:
            if tensor.size >= 16 and key not in buffers:
                raise StageError(f"stamped export: initializer {value.name} {list(tensor.shape)} is no parameter of "
                                 "the template (a derived weight cannot be bound); use decoder_export: trace")
            continue
        if value.name != found:
            value.name = found
        params.add(param_pattern(found.removesuffix("_t")))
    return params


def _descendants(values: list[ir.Value], through_shape: bool = True) -> set[ir.Node]:
    """Every node downstream of ``values`` (``through_shape=False``: not past a Shape node, whose
    output depends on the input's size only)."""
    seen: set[ir.Node] = set()
    stack = [user for v in values for user, _ in v.uses()]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if through_shape or node.op_type != "Shape":
                stack.extend(user for out in node.outputs for user, _ in out.uses())
    return seen


def _block(graph: ir.Graph, last: int) -> tuple[list[ir.Node], dict[str, ir.Value]]:
    """(nodes to clone per stamped layer, in graph order; the template last layer's past inputs).

    The layer's own nodes, plus the unscoped ones it needs that are computed from its past:
    torch.export puts ``sym_size`` nodes outside any module (the total length seq + past, and
    the batch size it may take from any input, e.g. ``Shape(past_key_values.<last>.key)``, which
    layer 0 then shares): cloned per layer, each stamped layer reads only its own past.
    """
    from stages.lib.segments.cuts import layer_of

    inputs = {v.name: v for v in graph.inputs}
    past = {kv: inputs[f"past_key_values.{last}.{kv}"] for kv in ("key", "value")}
    own = {n for n in graph if layer_of(n) == last}
    below = _descendants([o for n in own for o in n.outputs])  # the layer's consumers: norm, lm_head
    # other layers may read the past's size (a shared Shape), never its data
    wrong = [n for n in _descendants(list(past.values()), through_shape=False) | below
             if n not in own and layer_of(n) is not None]
    if wrong:
        raise StageError(f"stamped export: node {wrong[0].name} of layer {layer_of(wrong[0])} depends on "
                         f"template layer {last}; the layers are not independent, use decoder_export: trace")
    from_past = {n for n in _descendants(list(past.values())) - below if layer_of(n) is None}
    members = set(own)
    for node in reversed(list(graph)):  # reverse topological: keep what a member needs
        if node in from_past and any(u in members for o in node.outputs for u, _ in o.uses()):
            members.add(node)
    return [n for n in graph if n in members], past


def stamp_layers(model: ir.Model, n_layers: int, n_deepstack: int) -> list[str]:
    """Clone the template's last layer for layers K..n_layers-1 in place; return the cut list.

    Values from outside the layer stay shared references (rotary cos/sin, mask, shape tensors),
    except the residual stream (the previous layer's cut) and the layer's past inputs; the
    layer's weights get per-layer initializers named ``...layers.<j>...`` (bound later).
    """
    import onnx_ir as ir

    from stages.lib.export.decoder import io_names
    from stages.lib.segments.cuts import cuts_from_name_scopes

    graph = model.graph
    cuts = cuts_from_name_scopes(model)
    k = len(cuts)
    if k < 2 or k > n_layers:
        raise StageError(f"stamped export: the template graph has {k} layer cut(s), needs 2..{n_layers}")
    if k == n_layers:
        return cuts
    values = {o.name: o for n in graph for o in n.outputs}
    last = k - 1
    block, past = _block(graph, last)
    members = set(block)
    res_in, res_out = values[cuts[last - 1]], values[cuts[last]]
    outside = [v for n in block for v in n.inputs if v is not None and v.producer() not in members]
    stream = _descendants([res_in]) - members
    entering = {v for v in outside if v is res_in or v.producer() in stream}
    if entering != {res_in}:
        raise StageError(f"stamped export: layer {last} reads {sorted(str(v.name) for v in entering)} from the "
                         f"residual stream, expected only {res_in.name}")
    tail = [(u, i) for u, i in res_out.uses() if u not in members]  # the final norm: rewired at the end
    presents = {o.name: o for o in graph.outputs}
    # a list in first-use order, not a set: the initializer order (and so the external data file)
    # must not change from run to run
    weights = list(dict.fromkeys(v for v in outside if v.is_initializer() and f"layers.{last}." in str(v.name)))
    anchor, prev = block[-1], res_out
    new_inputs: list[ir.Value] = []
    new_outputs: list[ir.Value] = []
    for j in range(k, n_layers):
        vmap: dict[ir.Value, ir.Value] = {res_in: prev}
        for kv, v in past.items():
            vmap[v] = ir.Value(name=f"past_key_values.{j}.{kv}", type=v.type,
                               shape=v.shape.copy() if v.shape is not None else None)
            new_inputs.append(vmap[v])
        for w in weights:
            vmap[w] = ir.Value(name=str(w.name).replace(f"layers.{last}.", f"layers.{j}."), type=w.type,
                               shape=w.shape.copy() if w.shape is not None else None, const_value=w.const_value)
            graph.register_initializer(vmap[w])
        clones = [clone_node(n, vmap, "layers", last, j, _SUBGRAPH) for n in block]
        graph.insert_after(anchor, clones)
        anchor = clones[-1]
        for kv in ("key", "value"):
            out = vmap[presents[f"present.{last}.{kv}"]]
            out.name = f"present.{j}.{kv}"
            new_outputs.append(out)
        prev = vmap[res_out]
        cuts.append(str(prev.name))
    for user, i in tail:
        user.replace_input_with(i, prev)
    for i, v in enumerate(new_inputs):  # after the template's past inputs; deepstack inputs stay last
        graph.inputs.insert(3 + 2 * k + i, v)
    graph.outputs.extend(new_outputs)
    graph.sort()  # stable: only moves what the rewired final norm needs after the last layer
    want_in, want_out = io_names(n_layers, n_deepstack)
    got_in, got_out = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    if got_in != want_in or got_out != want_out:
        raise StageError(f"stamped export: graph I/O {got_in[:4]}... / {got_out[:4]}... differ from the decoder's "
                         f"{want_in[:4]}... / {want_out[:4]}...")
    return cuts


def _expected(template: Any, n_layers: int) -> list[str]:
    """Graph paths of every parameter of the whole decoder (the template's, per layer)."""
    paths: list[str] = []
    for name, _ in template.named_parameters():
        path = _graph_path(name)
        pattern = param_pattern(path)
        paths += [pattern.replace("layers.#.", f"layers.{j}.") for j in range(n_layers)] if "layers.#." in pattern else [path]
    return list(dict.fromkeys(paths))


def export_stamped(ckpt: Path, family: str, n_deepstack: int, out_path: Path, dtype: str, opset: int,
                   sample: dict[str, int], trust_remote_code: bool = False) -> dict[str, Any]:
    """Export the checkpoint's decoder to ``out_path`` (trace K layers, stamp, bind); export facts
    like ``decoder_export.export_decoder_graph`` (``layers`` is the checkpoint's depth)."""
    import gc

    from stages.lib.checkpoints.local import load_config_hf
    from stages.lib.export import decoder as dx
    from stages.lib.export import lazy_weights as lw
    from stages.lib.export.decoder_load import template_decoder
    from stages.lib.segments.cuts import write_cuts

    t0 = time.perf_counter()
    config = load_config_hf(ckpt, trust_remote_code)
    dims = dx.decoder_dims(config.text_config)
    k = template_layers(dims["layers"], n_deepstack)
    blocker = stamp_blocker(config.text_config, n_deepstack)
    if blocker:
        raise StageError(f"checkpoint {ckpt}: cannot stamp the decoder: {blocker}; export it with one trace")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    template = template_decoder(ckpt, dtype, k, vocab=min(TEMPLATE_VOCAB, dims["vocab"]),
                                trust_remote_code=trust_remote_code)
    lw.check_tensors(ckpt, _expected(template, dims["layers"]), tied)  # a missing tensor: before the trace
    model = dx.trace_decoder(template, family, n_deepstack, dtype, opset, sample)
    params = name_initializers(model.graph, template)
    cuts = stamp_layers(model, dims["layers"], n_deepstack)
    nbytes = lw.bind_weights(model, params, ckpt, dtype, tied)
    del template
    gc.collect()  # the template's random tensors: no longer referenced by the graph
    write_cuts(model, cuts)
    lw.save(model, out_path, nbytes > dx.EXTERNAL_DATA_BYTES)
    return {"export_seconds": time.perf_counter() - t0, "exporter": "dynamo", "decoder_export": "stamp",
            "template_layers": k, "weight_bytes": nbytes,
            "external_data": out_path.with_name(out_path.name + ".data").exists(), **dims}
