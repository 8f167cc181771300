"""Layer-wise drill-down: where, block by block, does a graph start to disagree with PyTorch?

1. Find each transformer block's output tensor in the ONNX graph. Blocks are recognised by the
   module path the exporter records: ``pkg.torch.onnx.name_scopes`` / ``namespace`` metadata
   (``torch.onnx.export(dynamo=True)``: node names are ``node_add_3``, useless) or the node name
   (``/blocks.3/Add``, TorchScript). A block's output is the last tensor, in graph order, that a
   node of block k produces and a node outside block k consumes: the residual sum that feeds
   block k+1 (or the Q/DQ pair in front of it). Nodes a quantizer added without a scope are
   simply "outside", which keeps that rule true in Q/DQ graphs; nodes a fusion rewrite made
   (no scope at all) inherit their producers' block.
2. Run the graph once in onnxruntime with all graph optimizations off (docs/FIELD_NOTES.md §3: ORT's Q/DQ
   fusions change rounding and reject FP8), those tensors exposed, block by block through the
   segment runner (stages/lib/segments/runner.py): a whole-graph session of a 7-8B decoder does not fit
   a 24 GB machine; a graph without cuts runs as one segment.
3. Capture the same points in PyTorch with forward hooks on the model's block modules.
4. Compare per block (stages/lib/metrics) and name the first block where the error jumps:
   the first block whose rel-L2 increase over the previous block is at least ``share`` of the
   largest increase and above ``floor`` (quantization noise grows smoothly block after block;
   a broken block adds a step, and later amplification of that step does not move the answer
   because the *first* block over the bar wins).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.dtypes import ORT_FLOATS
from stages.lib.parity.metrics import compare

if TYPE_CHECKING:
    import onnx

KINDS = ("blocks", "layers", "stages")  # ViT blocks, decoder layers, CNN stages
_BLOCK = re.compile(r"(?:^|[/.: ])(" + "|".join(KINDS) + r")\.(\d+)(?=$|[/.: _])")


_QDQ = ("QuantizeLinear", "DequantizeLinear")


def fit_feeds(graph: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as the graph declares them: float arrays cast to the input's float type (an FP16
    graph takes FP16), a lone image tensor renamed to a lone input (BYO graphs), extras dropped.
    ``graph``: a session (``get_inputs``), its input list, or a model path (read without weights)."""
    from stages.lib.segments.runner import graph_inputs

    ins = graph.get_inputs() if hasattr(graph, "get_inputs") else graph if isinstance(graph, list) else \
        graph_inputs(graph)
    if len(ins) == 1 and len(feeds) == 1 and ins[0].name not in feeds:
        feeds = {ins[0].name: next(iter(feeds.values()))}
    out = {}
    for i in ins:
        if i.name in feeds:
            v, want = feeds[i.name], ORT_FLOATS.get(i.type)
            out[i.name] = v.astype(want) if want is not None and np.issubdtype(v.dtype, np.floating) else v
    return out


def node_block(node: onnx.NodeProto, kind: str) -> int | None:
    """Block index of a node for ``kind`` ("blocks" or "layers"), or None if outside blocks."""
    meta = {p.key: p.value for p in node.metadata_props}
    texts: list[str] = []
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            texts += [str(s) for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])]
        except (ValueError, SyntaxError):
            pass
    texts += [meta.get("namespace", ""), node.name]
    for t in texts:
        for m in _BLOCK.finditer(t if t.startswith("/") else "/" + t):
            if m.group(1) == kind:
                return int(m.group(2))
    return None


def _anonymous(node: onnx.NodeProto) -> bool:
    """A node a rewriter made (``node_Gemm_14``): no exporter scope and no path in its name."""
    keys = {p.key for p in node.metadata_props}
    return not ({"namespace", "pkg.torch.onnx.name_scopes"} & keys) and "/" not in node.name


def node_blocks(model: onnx.ModelProto, kind: str) -> list[int | None]:
    """Block of every node in graph order. Nodes a fusion pass rewrote carry no scope; they
    inherit the block of their producers when all scoped producers agree (forward only, and
    never for Q/DQ, which sit *between* blocks as often as inside them)."""
    nodes = list(model.graph.node)
    blocks = [node_block(n, kind) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    for _ in range(4):  # rewritten chains are short; each pass reaches one node further
        changed = False
        for i, n in enumerate(nodes):
            if blocks[i] is not None or not _anonymous(n) or n.op_type in _QDQ:
                continue
            near = {blocks[producer[t]] for t in n.input if t in producer} - {None}
            if len(near) == 1:
                blocks[i] = near.pop()
                changed = True
        if not changed:
            break
    return blocks


def block_outputs(model: onnx.ModelProto, kind: str) -> dict[int, str]:
    """Block index -> the tensor name of that block's output (see module docstring)."""
    nodes = list(model.graph.node)
    # Q/DQ pairs count as outside every block: a block's output is the activation itself, not
    # its quantized copy (which a Q/DQ pair named after the tensor would otherwise claim).
    blocks = [None if n.op_type in _QDQ else b for n, b in zip(nodes, node_blocks(model, kind), strict=True)]
    consumers: dict[str, set[int | None]] = {}
    for b, n in zip(blocks, nodes, strict=True):
        for i in n.input:
            consumers.setdefault(i, set()).add(b)
    out: dict[int, str] = {}
    for b, n in zip(blocks, nodes, strict=True):  # graph order: later producers win
        if b is None:
            continue
        for o in n.output:
            if o and any(c != b for c in consumers.get(o, ())):
                out[b] = o
    return dict(sorted(out.items()))


def run_marked(model_path: Path, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run the graph once, segment by segment, and return the tensors ``names``."""
    from stages.lib.segments.runner import run_whole

    return run_whole(model_path, fit_feeds(model_path, feeds), list(names))


def capture_torch(points: Sequence[tuple[Any, str]], fn: Callable[[], Any]) -> list[np.ndarray]:
    """Tensors at ``(module, "out" | "in")`` points during ``fn()``: a module's output (first
    element of a tuple) or its hidden-state input (first positional or ``hidden_states``)."""
    import torch

    got: dict[int, np.ndarray] = {}

    def keep(i: int, t: Any) -> None:
        t = t[0] if isinstance(t, tuple | list) else t
        got.setdefault(i, t.detach().float().cpu().numpy())  # first call only: one forward pass

    handles = []
    for i, (mod, where) in enumerate(points):
        if where == "in":
            handles.append(mod.register_forward_pre_hook(
                lambda _m, a, kw, i=i: keep(i, a[0] if a else kw["hidden_states"]), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, i=i: keep(i, out)))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(points)) if i not in got]
    if missing:
        raise RuntimeError(f"forward hooks at points {missing} never fired")
    return [got[i] for i in range(len(points))]


def row_order(before: np.ndarray, after: np.ndarray) -> np.ndarray | None:
    """Indices ``p`` with ``after == before[p]`` row-wise (a pure reordering such as Qwen2.5-VL's
    window permutation), found by exact row matching, or None if it is not one."""
    a, b = before.reshape(before.shape[0], -1), after.reshape(after.shape[0], -1)
    if a.shape != b.shape:
        return None
    where = {r.tobytes(): i for i, r in enumerate(a)}
    if len(where) != len(a):
        return None  # repeated rows: ambiguous
    p = [where.get(r.tobytes(), -1) for r in b]
    return np.asarray(p) if min(p) >= 0 else None


def compare_blocks(onnx_outs: dict[int, np.ndarray], torch_outs: Sequence[np.ndarray],
                   orders: Sequence[np.ndarray | None] = (None,)) -> tuple[list[dict[str, Any]], int]:
    """Per-block figures. ``orders`` are candidate row permutations of the PyTorch tensors (e.g.
    Qwen2.5-VL's window order vs processor order); the one that matches block 0 best is used
    for all blocks. Returns (rows, index of the order used)."""

    def aligned(t: np.ndarray, o: np.ndarray | None, size: int) -> np.ndarray | None:
        if t.size != size:
            return None
        if o is not None:
            t = t.reshape(len(o), -1)[o] if t.size % len(o) == 0 else t
        return t.reshape(-1)

    first = min(onnx_outs) if onnx_outs else None
    best = 0
    if first is not None and first < len(torch_outs) and len(orders) > 1:
        cos = []
        for o in orders:
            a = aligned(torch_outs[first], o, onnx_outs[first].size)
            cos.append(compare(onnx_outs[first].reshape(-1), a).cosine if a is not None else -2.0)
        best = int(np.nanargmax(cos))
    rows = []
    for b, out in sorted(onnx_outs.items()):
        ref = aligned(torch_outs[b], orders[best], out.size) if b < len(torch_outs) else None
        if ref is None:
            rows.append({"block": b, "status": "shape mismatch", "shape": list(out.shape)})
            continue
        rows.append({"block": b, "status": "ok", "shape": list(out.shape),
                     **compare(out.reshape(-1), ref).as_dict()})
    return rows, best


def find_jump(rows: Sequence[dict[str, Any]], share: float = 0.5, floor: float = 1e-3) -> dict[str, Any]:
    """The first block whose rel-L2 step is >= ``share`` x the largest step and > ``floor``."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {"block": None, "why": "no block could be compared"}
    prev, steps = 0.0, []
    for r in ok:
        rel = float(r["rel_l2"]) if np.isfinite(r["rel_l2"]) else float("inf")
        steps.append(rel - prev)
        prev = rel
    big = max(steps)
    if not big > floor:
        return {"block": None, "why": f"no rel-L2 step above {floor:g} (largest {big:.3g})", "steps": steps}
    for r, s in zip(ok, steps, strict=True):
        if s >= share * big:
            return {"block": int(r["block"]), "step": s, "largest_step": big, "steps": steps,
                    "why": f"rel-L2 rises by {s:.3g} at block {r['block']} (largest step {big:.3g})"}
    return {"block": None, "why": "unreachable", "steps": steps}  # pragma: no cover


def plot(rows: Sequence[dict[str, Any]], title: str, path: Path, jump: int | None = None) -> Path:
    """Per-block cosine and rel-L2 as a PNG (the same figure the HTML report embeds)."""
    from pipeline.plots import block_errors_png, save_png

    save_png(path, block_errors_png([r for r in rows if r.get("status") == "ok"], title, jump))
    return path


def drilldown(model_path: Path, feeds: dict[str, np.ndarray], kind: str, torch_outs: Sequence[np.ndarray],
              orders: Sequence[np.ndarray | None] = (None,)) -> dict[str, Any]:
    """Mark, run, compare and locate. ``torch_outs``: per-block PyTorch outputs for ``feeds``."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    points = block_outputs(proto, kind)
    if not points:
        return {"kind": kind, "blocks": [], "jump": {"block": None, "why": f"no '{kind}.N' scopes in the graph"}}
    got = run_marked(model_path, feeds, list(points.values()))
    rows, order = compare_blocks({b: got[t] for b, t in points.items()}, torch_outs, orders)
    for r in rows:
        r["tensor"] = points[r["block"]]
    return {"kind": kind, "blocks": rows, "order": order, "jump": find_jump(rows)}
