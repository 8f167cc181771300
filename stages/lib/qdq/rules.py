"""Q/DQ placement rules as data: one table per mode, read by `placement.plan`.

The tables encode what TensorRT's explicit-quantization fusions reward (docs/FIELD_NOTES.md §2, TensorRT
developer guide, Model-Optimizer's partitioning): Q/DQ on the *inputs* of the compute ops,
weights per-channel on their output-channel axis, activations per-tensor and symmetric,
bias never, and nothing inside the chains TensorRT fuses by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Weight axis codes: an int is a fixed axis; "gemm_out"/"gemm_in" depend on Gemm's transB.
AxisCode = int | str


@dataclass(frozen=True)
class OpRule:
    """Which input slots of one op type take Q/DQ."""

    activations: tuple[int, ...]  # slots quantized per-tensor when they are not constants
    weight: int | None  # slot holding the weight when it is a constant
    weight_axis: AxisCode  # per-channel axis (int8/fp8): the output-channel axis
    block_axis: AxisCode | None = None  # int4 block axis: the reduction (input-channel) axis
    never: tuple[int, ...] = ()  # slots never quantized (bias): TensorRT keeps them in fp32


CONV = OpRule(activations=(0,), weight=1, weight_axis=0, never=(2,))
CONV_T = OpRule(activations=(0,), weight=1, weight_axis=1, never=(2,))  # W is [Cin, Cout/g, ...]
# MatMul B is [K, N]: channels along the last axis (N), blocks along K.
MATMUL = OpRule(activations=(0, 1), weight=1, weight_axis=-1, block_axis=-2)
GEMM = OpRule(activations=(0,), weight=1, weight_axis="gemm_out", block_axis="gemm_in", never=(2,))

# Ops whose inputs are never cut by a Q/DQ pair. Norm and activation chains are fused by
# TensorRT's pointwise/normalization kernels; data movement is propagated through by the
# builder, so a Q/DQ there only splits a fusion. Residual Add and the FP8 softmax output are
# the only exceptions and have their own rules below.
NEVER_CUT_OPS: frozenset[str] = frozenset(
    {
        # norms (primitive and fused forms)
        "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
        "BatchNormalization", "InstanceNormalization", "GroupNormalization",
        "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div",
        # activations
        "Relu", "Gelu", "FastGelu", "BiasGelu", "Sigmoid", "Silu", "Tanh", "Erf", "HardSwish",
        "Softmax", "MaxPool", "AveragePool", "GlobalAveragePool",
        # data movement
        "Reshape", "Transpose", "Gather", "Concat", "Slice", "Split", "Where", "Squeeze",
        "Unsqueeze", "Expand", "Flatten", "Cast", "Identity",
    }
)

@dataclass(frozen=True)
class SmallMatmul:
    """GEMV-like and tiny matmuls stay high precision: no tensor-core win, only error."""

    unit_dim: int = 1  # M or N equal to this -> GEMV
    min_dim: int = 16  # K or N below this -> tiny


@dataclass(frozen=True)
class ModeRules:
    name: str
    qtype: str  # "int8" | "float8e4m3fn" | "int4": a storage type of dtypes.QTYPES
    qmax: float  # largest representable magnitude: scale = amax / qmax
    ops: dict[str, OpRule]
    weights: str  # "per-channel" | "block"
    activations: bool  # activations get Q/DQ (False: weight-only)
    # Residual Add of a conv partition (the fuse stage's `residual_add` role): its skip input,
    # the one from outside the partition, gets Q/DQ; the conv branch fuses into the epilogue.
    # (Transformer residual Adds are in no partition: their stream carries outliers and
    # TensorRT adds it in fp16.)
    residual_add_skip: bool = False
    concat_shared_scale: bool = False  # Concat inputs/outputs quantized with one scale
    # Attention BMMs (MatMul with two activation inputs): "none" leaves them high precision
    # (Q/DQ on projections only keeps TensorRT's fused MHA: docs/FIELD_NOTES.md §1); "fp8-mha" quantizes the
    # pattern DQ→BMM1→(scale)→(mask)→Softmax→Q/DQ(1/448)→BMM2 that TensorRT's FP8 MHA fuses.
    attention: tuple[str, ...] = ("none",)
    head_dim: tuple[int, int] = (8, 256)  # (exclusive low, inclusive high) for fp8-mha
    small: SmallMatmul = field(default_factory=SmallMatmul)
    # (node-name glob, why) kept high precision by default in this mode.
    default_keep: tuple[tuple[str, str], ...] = ()
    opset_min: int = 13
    # Keep the matmul that directly produces a graph output named like logits (lm_head) even
    # when the exporter did not keep the module name.
    keep_logits_head: bool = False
    # Keep the layer that reads raw pixels (the patch embedding) even when fusion renamed it:
    # found structurally, through data movement, from a graph input named like pixel_values.
    keep_pixel_reader: bool = False


INT8 = ModeRules(
    name="int8",
    qtype="int8",
    qmax=127.0,
    ops={"Conv": CONV, "ConvTranspose": CONV_T, "Gemm": GEMM, "MatMul": MATMUL},
    weights="per-channel",
    activations=True,
    residual_add_skip=True,
    concat_shared_scale=True,
    attention=("none",),
    opset_min=13,  # per-channel DequantizeLinear(axis)
)

FP8 = ModeRules(
    name="fp8",
    qtype="float8e4m3fn",
    qmax=448.0,
    ops={"Conv": CONV, "ConvTranspose": CONV_T, "Gemm": GEMM, "MatMul": MATMUL},
    weights="per-channel",
    activations=True,
    residual_add_skip=True,
    concat_shared_scale=True,
    attention=("none", "fp8-mha"),
    default_keep=(
        # Model-Optimizer keeps the Qwen3-VL patch embedding high precision in FP8 (its PR 2083):
        # raw pixels have a wide range that E4M3 per-tensor scaling clips.
        ("*patch_embed*", "patch embedding: raw-pixel range, kept high precision in FP8 (docs/FIELD_NOTES.md §2.11)"),
    ),
    keep_pixel_reader=True,
    opset_min=19,  # FLOAT8E4M3FN in QuantizeLinear/DequantizeLinear
)

INT4_WEIGHT = ModeRules(
    name="int4-weight",
    qtype="int4",
    qmax=7.0,
    ops={"Gemm": GEMM, "MatMul": MATMUL},  # TensorRT's weight-only INT4 gemm: no Conv
    weights="block",
    activations=False,
    default_keep=(("*lm_head*", "lm_head: output logits are the most INT4-sensitive layer"),),
    keep_logits_head=True,
    opset_min=21,  # DequantizeLinear(block_size) and INT4
)

MODES: dict[str, ModeRules] = {m.name: m for m in (INT8, FP8, INT4_WEIGHT)}


def rules_for(mode: str) -> ModeRules:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(MODES)})")
    return MODES[mode]


def resolve_axis(code: AxisCode | None, op_type: str, attrs: dict[str, int], rank: int) -> int | None:
    """Turn an axis code into a non-negative axis for a weight of this rank."""
    if code is None:
        return None
    if code == "gemm_out":  # Gemm B is [K, N], or [N, K] with transB
        return 0 if attrs.get("transB", 0) else 1
    if code == "gemm_in":
        return 1 if attrs.get("transB", 0) else 0
    assert isinstance(code, int)
    return code % rank
