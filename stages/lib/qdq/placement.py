"""Where Q/DQ pairs go: apply the rule tables of `rules.py` to one graph (no edits here).

What TensorRT fuses is read from the fuse stage's partition tags (`fusion.annotate.Partitions`)
and from nowhere else: no Q/DQ inside a partition, the residual Add's skip input quantized, the
FP8 MHA inputs taken from an `mha` partition's roles. A graph that did not pass through the
fuse stage has no partitions: nothing is then protected, and no attention BMM is quantized."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.lib.fusion.annotate import Partitions
from stages.lib.qdq.patterns import attrs, reads_pixels, shape_of, small_reason
from stages.lib.qdq.rules import ModeRules, resolve_axis, rules_for

if TYPE_CHECKING:
    import onnx_ir as ir

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class Site:
    """One Q/DQ pair (or one DQ-only weight) to insert on `tensor` for `uses`."""

    tensor: str
    uses: list[tuple[str, int]]  # (consumer node name, input slot)
    kind: str  # "activation" | "weight"
    rule: str  # which rule placed it (for the report and tests)
    axis: int | None = None  # per-channel axis (weights) / block axis (int4)
    fixed_amax: float | None = None  # e.g. softmax output in the FP8 MHA pattern
    group: str | None = None  # shared-scale group (Concat)


@dataclass
class Placement:
    mode: str
    sites: list[Site] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"node","rule","why"}
    kept: list[dict[str, str]] = field(default_factory=list)  # {"node","pattern","why"}
    groups: dict[str, list[str]] = field(default_factory=dict)  # group id -> tensors
    scopes: dict[str, str] = field(default_factory=dict)  # node name -> module path (when exported)

    def site(self, tensor: str, kind: str | None = None) -> Site | None:
        return next((s for s in self.sites if s.tensor == tensor and kind in (None, s.kind)), None)

    def quantized_nodes(self) -> set[str]:
        return {n for s in self.sites for n, _ in s.uses}


def _nm(node: ir.Node) -> str:
    return node.name or ""


def ensure_names(graph: ir.Graph) -> None:
    """Give every node a unique name: sites and reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def scope_of(node: ir.Node) -> str:
    """The PyTorch module path of a node (torch.onnx dynamo's name_scopes metadata), or "".

    Dynamo names nodes `node_linear_3`; the module path (`model.layers.0.self_attn.q_proj`) is
    what users write keep patterns against and what sensitivity groups by.
    """
    import ast

    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return ""
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""


def is_const(v: ir.Value | None) -> bool:
    if v is None:
        return False
    if v.const_value is not None:
        return True
    p = v.producer()
    return p is not None and p.op_type == "Constant"


def plan(
    graph: ir.Graph,
    mode: str,
    shapes: Shapes | None = None,
    keep: Iterable[str] = (),
    attention: str = "none",
    keep_nodes: Mapping[str, str] | None = None,
    partitions: Partitions | None = None,
) -> Placement:
    """Decide every Q/DQ site for `mode`. `keep` are node-name globs kept high precision;
    `keep_nodes` maps exact node names to a reason (the sensitivity pass's fallbacks);
    `partitions` (default: read from the graph's tags) say which edges TensorRT fuses."""
    rules = rules_for(mode)
    parts = Partitions(graph) if partitions is None else partitions
    if attention not in rules.attention:
        raise ValueError(f"attention placement {attention!r} is not available in {mode} ({rules.attention})")
    shapes = shapes or {}
    ensure_names(graph)
    pl = Placement(mode)
    patterns = [(g, f"keep_high_precision pattern {g!r}") for g in keep] + list(rules.default_keep)
    by_tensor: dict[tuple[str, str], Site] = {}

    def add(v: ir.Value | None, node: ir.Node, slot: int, kind: str, rule: str, **kw: Any) -> None:
        if v is None:
            return
        key = (v.name or "", kind)
        if key in by_tensor:
            by_tensor[key].uses.append((_nm(node), slot))
            return
        s = Site(v.name or "", [(_nm(node), slot)], kind, rule, **kw)
        by_tensor[key] = s
        pl.sites.append(s)

    def kept(node: ir.Node) -> bool:
        if rules.keep_logits_head and any(o.is_graph_output() and "logits" in (o.name or "") for o in node.outputs):
            why = "lm_head (produces the logits output): excluded from INT4 by default"
            pl.kept.append({"node": _nm(node), "pattern": "", "why": why})
            return True
        if rules.keep_pixel_reader and reads_pixels(node):
            why = "patch embedding (reads pixel_values): raw-pixel range, kept high precision in FP8 (docs/FIELD_NOTES.md §2.11)"
            pl.kept.append({"node": _nm(node), "pattern": "", "why": why})
            return True
        if keep_nodes and _nm(node) in keep_nodes:
            pl.kept.append({"node": _nm(node), "pattern": "", "why": keep_nodes[_nm(node)]})
            return True
        scope = pl.scopes.get(_nm(node), "")
        for pat, why in patterns:
            if fnmatch.fnmatchcase(_nm(node), pat) or (scope and fnmatch.fnmatchcase(scope, pat)):
                pl.kept.append({"node": _nm(node), "pattern": pat, "why": why})
                return True
        return False

    pl.scopes = {_nm(n): sc for n in graph if (sc := scope_of(n))}
    mha_done: set[str] = set()
    for node in graph:
        op = node.op_type
        if op in rules.ops:
            r = rules.ops[op]
            w = node.inputs[r.weight] if r.weight is not None and len(node.inputs) > r.weight else None
            consts = [i for i, x in enumerate(node.inputs) if is_const(x)]
            bmm = op == "MatMul" and not consts
            if bmm:
                if _nm(node) in mha_done:
                    continue
                mha = _fp8_mha(node, parts, rules, shapes) if attention == "fp8-mha" else None
                if mha is not None and not kept(node) and not kept(mha[1]):
                    probs, bmm2 = mha
                    for slot in (0, 1):
                        add(node.inputs[slot], node, slot, "activation", "fp8-mha.bmm1")
                    add(probs, bmm2, 0, "activation", "fp8-mha.softmax", fixed_amax=1.0)
                    add(bmm2.inputs[1], bmm2, 1, "activation", "fp8-mha.bmm2")
                    mha_done.add(_nm(bmm2))
                    continue
                member = parts.of(node)
                if member is not None and member.kind == "mha":
                    why = f"attention BMM ({member.group}) kept high precision: TensorRT fuses MHA with Q/DQ on projections only"
                else:
                    why = "activation x activation MatMul in no fused attention partition: kept high precision"
                pl.skipped.append({"node": _nm(node), "rule": "attention", "why": why})
                continue
            if w is None or not is_const(w):
                pl.skipped.append({"node": _nm(node), "rule": "weight", "why": "no constant weight"})
                continue
            small = small_reason(node, rules, shapes)
            if small:
                pl.skipped.append({"node": _nm(node), "rule": "small-matmul", "why": small})
                continue
            if kept(node):
                continue
            wshape = shape_of(w, shapes) or ()
            at = attrs(node)
            if rules.weights == "block":
                axis = resolve_axis(r.block_axis, op, at, len(wshape))
            else:
                axis = resolve_axis(r.weight_axis, op, at, len(wshape))
            add(w, node, r.weight or 0, "weight", f"{op}.weight", axis=axis)
            if rules.activations:
                for slot in r.activations:
                    x = node.inputs[slot] if slot < len(node.inputs) else None
                    if x is None or is_const(x) or slot == r.weight:
                        continue
                    if (group := parts.fused_edge(x.producer(), node)) is not None:
                        why = f"input {x.name} is inside the fused partition {group}"
                        pl.skipped.append({"node": _nm(node), "rule": "never-cut", "why": why})
                        continue
                    add(x, node, slot, "activation", f"{op}.input")
        elif op == "Add" and rules.residual_add_skip:
            member = parts.of(node)
            if member is None or member.role != "residual_add":
                continue
            # The input produced outside the partition is the skip; the branch fuses into the conv.
            skips = [(i, x) for i, x in enumerate(node.inputs)
                     if x is not None and not is_const(x) and parts.fused_edge(x.producer(), node) is None]
            if len(skips) == 1 and not kept(node):
                add(skips[0][1], node, skips[0][0], "activation", "residual-add.skip")

    if rules.concat_shared_scale:
        _share_concat_scales(graph, pl)
    return pl


def _fp8_mha(bmm1: ir.Node, parts: Partitions, rules: ModeRules, shapes: Shapes) -> tuple[ir.Value, ir.Node] | None:
    """(the tensor BMM2 reads as probabilities, BMM2) when ``bmm1`` is the BMM1 of an ``mha``
    partition whose head dim TensorRT's FP8 MHA kernels take; else None."""
    member = parts.of(bmm1)
    if member is None or member.kind != "mha" or member.role != "bmm1":
        return None
    bmm2 = parts.node(member.group, "bmm2")
    hd = shape_of(bmm1.inputs[0], shapes)
    if bmm2 is None or bmm2.inputs[0] is None or hd is None or not (rules.head_dim[0] < hd[-1] <= rules.head_dim[1]):
        return None
    return bmm2.inputs[0], bmm2


def _share_concat_scales(graph: ir.Graph, pl: Placement) -> None:
    """Union each Concat's inputs and output into one scale group (TensorRT concatenates
    quantized tensors without requantizing only when they share one scale)."""
    parent: dict[str, str] = {}
    members: set[str] = set()

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for node in graph:
        if node.op_type != "Concat":
            continue
        names = [v.name for v in node.inputs if v is not None and not is_const(v)]
        names.append(node.outputs[0].name)
        members.update(n or "" for n in names)
        root = find(names[0] or "")
        for n in names[1:]:
            parent[find(n or "")] = root
    for s in pl.sites:
        if s.kind == "activation" and s.tensor in members and s.fixed_amax is None:
            g = find(s.tensor)
            s.group = g
            pl.groups.setdefault(g, []).append(s.tensor)
