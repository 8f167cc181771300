"""The engine layer report: which layers an engine has, what fused, and in which precision.

Source: the builder's VERBOSE log with `profiling_verbosity = DETAILED`, which ends the build
with a `Layers:` block, one line per engine layer (docs/FIELD_NOTES.md §1)::

    Name: …, LayerType: gemm, Inputs: [ { Name: …, Datatype: Int8, … }], Constants: [ … ],
    Outputs: [ … ], TacticName: …, StreamId: 0, Metadata: [ONNX Layer: …]

The engine inspector would give the same as JSON, but it needs a deserialized engine, i.e. a
GPU; the build log is what a CPU-only (TensorRT-RTX AOT) build can read.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# Layer types that do the GEMM/conv work, across the classic and the Myelin (RTX) backends;
# `runtime_fusion` is a Myelin GEMM with its pointwise epilogue fused (e.g. `__myl_FcAdd`).
GEMM_TYPES = {"gemm", "matrixmultiply", "matrix_multiply", "fullyconnected", "runtime_fusion"}
CONV_TYPES = {"correlation", "convolution", "deconvolution", "deconv", "caskconvolution", "cudnnconvolution"}
LOW = ("Int8", "FP8", "Int4", "FP4")
ACT_RE = re.compile(r"relu|gelu|silu|swish|sigmoid|tanh|clip|leaky", re.I)
MHA_RE = re.compile(r"mha|fmha|flash_?attn|attention", re.I)
# a runtime fusion that starts with a convolution (correlation) or a deconvolution (ConvTranspose):
# TensorRT-RTX names FP16 conv+epilogue fusions `__myl_CorrMulAdd…` and `__myl_DecoMulAddRelu`
FUSED_CONV_RE = re.compile(r"__myl_(Corr|Deco)")
# bookkeeping layers that run no math: multi-stream events and shape calls (TensorRT-RTX puts 29
# of them into the PP-OCRv4 detector's FP16 engine; they are not what a lean engine saves)
SYNC_TYPES = {"signal", "wait", "shape_call"}
_DT = re.compile(r"Datatype: (\w+)")


@dataclass
class Layer:
    name: str
    type: str
    inputs: list[str]  # datatypes of activation inputs
    constants: list[str]  # datatypes of weights/constants
    outputs: list[str]
    input_names: list[str]
    output_names: list[str]
    tactic: str
    onnx: list[str]  # ONNX node names fused into this layer

    @property
    def kind(self) -> str:
        t = self.type.lower()
        if self.is_mha:
            return "mha"
        if t in CONV_TYPES:
            return "conv"
        if t == "runtime_fusion":  # a Myelin fusion says what it starts with: __myl_Corr…, Deco…, Fc…
            if FUSED_CONV_RE.search(self.name):
                return "conv"
            return "gemm" if "fc" in self.name.lower() else "other"
        if t in GEMM_TYPES:
            return "gemm"
        return "other"

    @property
    def is_mha(self) -> bool:
        return bool(MHA_RE.search(self.name) or MHA_RE.search(self.tactic) or self.type.lower() == "attention")

    @property
    def precision(self) -> str:
        """The lowest-precision datatype among its inputs and weights (what the math runs in)."""
        for dt in (*LOW, "Half", "BFloat16", "Float"):
            if dt in self.inputs or dt in self.constants:
                return dt
        return (self.inputs or self.outputs or ["none"])[0]


def _section(line: str, key: str, next_keys: tuple[str, ...]) -> str:
    start = line.find(f", {key}: ")
    if start < 0:
        return ""
    start += len(key) + 4
    ends = [i for k in next_keys if (i := line.find(f", {k}: ", start)) >= 0]
    return line[start:min(ends) if ends else len(line)]


def _field(line: str, key: str) -> str:
    m = re.search(rf"(?:^|, ){key}: ([^,]*)", line)
    return m.group(1).strip() if m else ""


def parse_layer_line(line: str) -> Layer:
    ins = _section(line, "Inputs", ("Constants", "Outputs", "TacticName"))
    consts = _section(line, "Constants", ("Outputs", "TacticName"))
    outs = _section(line, "Outputs", ("TacticName",))
    names = re.compile(r"\{ Name: ([^,]+),")
    return Layer(
        name=_field(line, "Name"), type=_field(line, "LayerType"),
        inputs=_DT.findall(ins), constants=_DT.findall(consts), outputs=_DT.findall(outs),
        input_names=names.findall(ins), output_names=names.findall(outs),
        tactic=_field(line, "TacticName"),
        onnx=re.findall(r"\[ONNX Layer: ([^\]]+)\]", line.split(", Metadata: ", 1)[-1]),
    )


def parse_layers(log: list[str] | str) -> list[Layer]:
    """The layers of the *last* `Layers:` block in a build log (one block per built engine)."""
    text = log if isinstance(log, str) else "\n".join(log)
    start = text.rfind("Layers:\nName: ")
    if start < 0:
        return []
    out = []
    for line in text[start + len("Layers:\n"):].splitlines():
        if not line.startswith("Name: "):
            break  # the block ends at the blank line before `I/O Tensors:`
        out.append(parse_layer_line(line))
    return out


@dataclass
class LayerSummary:
    layers: int
    compute_layers: int  # layers less the bookkeeping ones (SYNC_TYPES)
    layer_types: dict[str, int]
    fused_mha: int
    mha_precisions: dict[str, int]
    gemm_conv_layers: int
    gemm_conv_precisions: dict[str, int]
    low_precision_share: float  # share of GEMM/conv layers running INT8/FP8 (INT4/FP4)
    conv_layers: int
    conv_fused_activation: int
    # attention coverage, when the ONNX op types are known: Softmax nodes of the graph and how
    # many of them ended inside a fused MHA kernel (the rest run as separate gemm/softmax layers)
    softmax_nodes: int | None = None
    softmax_in_mha: int | None = None
    per_layer: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ACT_OPS = {"Relu", "Gelu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
           "Softplus", "Mish", "PRelu"}


def _is_act(node: str, ops: dict[str, str] | None) -> bool:
    op = (ops or {}).get(node)
    return op in ACT_OPS if op is not None else bool(ACT_RE.search(node))


def _fused_activation(layer: Layer, consumers: list[Layer], ops: dict[str, str] | None) -> bool:
    """Conv whose activation ran in the conv kernel or in its own epilogue (one kernel launch).

    On the Myelin backend a Conv+ReLU is a `correlation` layer plus a pointwise `kgen` epilogue
    named after its ops (`__myl_MulAddMoveRelu`) that carries the conv's ONNX node in its
    metadata: that is the conv's epilogue, not a separate ReLU layer over a stored tensor. In
    FP16 the activation's ONNX node is listed in the conv layer's own metadata. `ops` maps ONNX
    node names to op types (from the graph); without it node names are matched by pattern.
    """
    if any(_is_act(n, ops) for n in layer.onnx) or ACT_RE.search(layer.tactic):
        return True
    for c in consumers:
        shares_node = bool(set(c.onnx) & set(layer.onnx))
        if shares_node and c.type.lower() in ("kgen", "pointwise") and (
                ACT_RE.search(c.name) or any(_is_act(n, ops) for n in c.onnx)):
            return True
    return False


def summarize(layers: list[Layer], onnx_ops: dict[str, str] | None = None) -> LayerSummary:
    by_input: dict[str, list[Layer]] = {}
    for lay in layers:
        for n in lay.input_names:
            by_input.setdefault(n, []).append(lay)
    heavy = [lay for lay in layers if lay.kind in ("gemm", "conv")]
    convs = [lay for lay in layers if lay.kind == "conv"]
    fused = sum(_fused_activation(c, [x for o in c.output_names for x in by_input.get(o, [])], onnx_ops)
                for c in convs)
    low = sum(lay.precision in LOW for lay in heavy)
    softmax = {n for n, op in (onnx_ops or {}).items() if op == "Softmax"}
    in_mha = {n for lay in layers if lay.is_mha for n in lay.onnx} & softmax
    return LayerSummary(
        layers=len(layers),
        compute_layers=sum(lay.type.lower() not in SYNC_TYPES for lay in layers),
        layer_types=dict(Counter(lay.type for lay in layers)),
        fused_mha=sum(lay.is_mha for lay in layers),
        mha_precisions=dict(Counter(lay.precision for lay in layers if lay.is_mha)),
        gemm_conv_layers=len(heavy),
        gemm_conv_precisions=dict(Counter(lay.precision for lay in heavy)),
        low_precision_share=round(low / len(heavy), 4) if heavy else 0.0,
        conv_layers=len(convs),
        conv_fused_activation=fused,
        softmax_nodes=len(softmax) if onnx_ops is not None else None,
        softmax_in_mha=len(in_mha) if onnx_ops is not None else None,
        per_layer=[{"name": lay.name, "type": lay.type, "kind": lay.kind, "precision": lay.precision,
                    "inputs": lay.inputs, "constants": lay.constants, "outputs": lay.outputs,
                    "tactic": lay.tactic, "onnx": lay.onnx} for lay in layers],
    )


def onnx_op_types(onnx_path: Any) -> dict[str, str]:
    """ONNX node name -> op type, read without the weights (names the engine metadata cites)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {n.name: n.op_type for n in m.graph.node if n.name}


def attention_blocks(onnx_path: Any) -> int:
    """How many attention blocks the fuse stage tagged in the graph (its ``mha`` groups): what
    ``fused_mha`` should reach, one fused kernel per block."""
    import onnx

    from stages.lib.fusion.annotate import GROUP, KIND

    m = onnx.load(str(onnx_path), load_external_data=False)
    groups = set()
    for n in m.graph.node:
        props = {p.key: p.value for p in n.metadata_props}
        if props.get(KIND) == "mha" and GROUP in props:
            groups.add(props[GROUP])
    return len(groups)


def report_from_log(log: list[str] | str, onnx_ops: dict[str, str] | None = None) -> LayerSummary:
    return summarize(parse_layers(log), onnx_ops)
