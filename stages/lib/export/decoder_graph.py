"""Post-export edits and the io spec of the decoder/embed ONNX graphs (structure only, no weights).

``finalize_graph`` gives the dynamo-exported decoder readable dims and names; ``io_spec`` writes
the CONTRACT's graph io spec (``decoder.json``). Both load the graph with
``load_external_data=False``: weights stay where they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.lib.dtypes import ONNX_DTYPES
from stages.lib.export.decoder import dynamic_axes


def _scope(node: Any) -> tuple[str, str]:
    """(TorchScript-style scope "text_model/layers.0/self_attn/q_proj", qualified module name
    "text_model.layers.0.self_attn.q_proj") of a dynamo-exported node, or ("", "").

    The exporter's ``namespace`` metadata is "<root>/<qualname>: <class>/.../<fx node>: <op>".
    """
    ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    if not ns.startswith(":"):
        return "", ""
    mods = [seg.split(":")[0].strip() for seg in ns.split("/")[1:-1]]
    rel = [q[len(mods[i - 1]) + 1:] if i and q.startswith(mods[i - 1] + ".") else q for i, q in enumerate(mods)]
    return "/".join(rel), (mods[-1] if mods else "")


def finalize_graph(path: Path, n_layers: int, n_deepstack: int) -> None:
    """Readable names on the exported graph, in place.

    * torch.export's symbolic dims (``s18``, ``s15 + s22``) -> batch / seq / past / total;
    * nodes named after their module path (``/text_model/layers.0/self_attn/q_proj/MatMul``, the
      TorchScript convention) instead of ``node_linear_3``, so ``quantize.*.keep_high_precision``
      globs such as ``*q_proj*`` and the drill-down reports can find them;
    * the constant-folded (transposed) MatMul weights named ``<module path>.weight_t`` instead of
      ``val_240``.

    Loads only the graph structure: weights stay in their external file when there is one.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    # torch 2.13 writes IR 10 even for opset 23 (which needs IR 11): declare what the opset needs
    m.ir_version = max(m.ir_version, onnx.helper.find_min_ir_version_for(list(m.opset_import)))
    g = m.graph
    axes = dynamic_axes(n_layers, n_deepstack)
    for vi in [*g.input, *g.output]:
        for ax, name in axes.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[ax]
            dim.ClearField("dim_value")
            dim.dim_param = name
    inits = {t.name: t for t in g.initializer}
    seen: dict[str, int] = {}
    renames: dict[str, str] = {}
    for node in g.node:
        scope, qual = _scope(node)
        if not scope:
            continue
        base = f"/{scope}/{node.op_type}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        node.name = base if k == 0 else f"{base}_{k}"
        w = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else ""
        if w in inits and w.startswith("val_") and w not in renames:
            renames[w] = qual + ".weight_t"
    taken = set(inits) | {i.name for i in g.input}
    for old, new in list(renames.items()):
        if new in taken:
            del renames[old]
        taken.add(new)
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    onnx.save_model(m, str(path))


def io_spec(path: Path) -> dict[str, Any]:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} of an ONNX file (CONTRACT's io spec)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def entry(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        # the graph's own dtype (a BF16 graph's io is "bfloat16"), not the host feed dtype (ONNX_NUMPY)
        return {"name": vi.name, "dtype": ONNX_DTYPES[tt.elem_type],
                "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]}

    return {"inputs": [entry(i) for i in m.graph.input], "outputs": [entry(o) for o in m.graph.output]}
