"""Typed, frozen build configuration: the schema a YAML build config must match (unknown keys
are errors); ``pipeline.config_io.load_config`` reads a file into it.

Each section belongs to one stage family; a stage's ``params`` function picks the fields it
uses, so editing one section re-keys only the stages that read it. Relative paths resolve
against the folder of the YAML file that names them (as DVC does), never the CWD.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.config_types import HW, Frozen, HWs, PosFloat, resolve_path

Precision = Literal["best", "fp8", "int8", "int4-weight", "fp16"]
Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# ImageNet normalisation: the default mean/std of a vision graph's input (config, calibration, CNN export)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A build name is a folder name under the artifacts root (runs/, out/, locks/): never a path.
BUILD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BUILD_NAME_RULE = ("a plain build name: 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                   "or digit (no '/', no '..')")


class OnnxGraphSource(Frozen):
    """Bring your own ONNX: an existing FP32 graph replaces the exported one."""

    path: Path
    input_name: str = "pixel_values"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    resize: HW = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PosFloat, PosFloat, PosFloat] = IMAGENET_STD
    # "resize": every image to `resize` (one engine shape). "keep-aspect": a graph dynamic in H and
    # W (a detector serving many page sizes): each image scaled, aspect kept, into
    # profiles.vision min_image..max_image, each side a multiple of `stride`; the engine's profile
    # is profiles.vision's min/opt/max
    fit: Literal["resize", "keep-aspect"] = "resize"
    stride: int = Field(32, ge=1)

    def preprocess(self, profile: VisionProfile) -> dict[str, Any]:
        """The declared preprocessing, as every stage that feeds the graph reads it (one dict)."""
        out: dict[str, Any] = {k: v for k, v in self.model_dump(mode="json").items() if k != "path"}
        if self.fit == "keep-aspect":
            out |= {"min_image": list(profile.min_image), "opt_image": list(profile.opt_image),
                    "max_image": list(profile.max_image)}
        return out

    _p = field_validator("path", mode="before")(resolve_path)

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"ONNX file {v} does not exist (expected an existing .onnx file)")
        return v


class ModelConfig(Frozen):
    checkpoint: Path | None = None  # a local Hugging Face checkpoint folder
    generate: Literal["tiny", "cnn-tiny"] | None = None  # the embedded, generated default
    family: Family | None = None  # for `generate`; detected from config.json otherwise
    seed: int = 0
    trust_remote_code: bool = False  # off unless the user asks: it runs code from the checkpoint
    vision_onnx: OnnxGraphSource | None = None

    _p = field_validator("checkpoint", mode="before")(resolve_path)

    @field_validator("checkpoint")
    @classmethod
    def _ckpt_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not (v / "config.json").is_file():
            what = "does not exist" if not v.exists() else "has no config.json"
            raise ValueError(f"checkpoint {v} {what} (expected a local Hugging Face checkpoint folder)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.checkpoint is not None and self.generate is not None:
            raise ValueError("set only one of model.checkpoint (a local folder) or model.generate, not both")
        # a bring-your-own vision ONNX alone is a complete (vision-only) model: no checkpoint needed
        if self.checkpoint is None and self.generate is None and self.vision_onnx is None:
            raise ValueError("set one of model.checkpoint (a local folder), model.generate "
                             "or model.vision_onnx (an existing ONNX file)")
        if self.generate == "tiny" and self.family is None:
            raise ValueError("model.generate: tiny needs model.family (qwen2_vl, qwen2_5_vl, qwen3_vl)")
        return self


class MinOptMax(Frozen):
    min: int
    opt: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> MinOptMax:
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"expected 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class VisionProfile(Frozen):
    min_image: HW = (56, 56)
    opt_image: HW = (224, 224)
    max_image: HW = (448, 448)
    max_images: int = Field(2, ge=1)


class DecoderProfile(Frozen):
    batch: MinOptMax = MinOptMax(min=1, opt=1, max=2)
    seq: MinOptMax = MinOptMax(min=1, opt=64, max=256)
    past: MinOptMax = MinOptMax(min=0, opt=64, max=256)  # 0: the prefill has no past

    @field_validator("batch", "seq")
    @classmethod
    def _at_least_one(cls, v: MinOptMax, info: ValidationInfo) -> MinOptMax:
        if v.min < 1:
            raise ValueError(f"expected min >= 1 (a {info.field_name} of 0 runs nothing), got {v.min}")
        return v


class Profiles(Frozen):
    vision: VisionProfile = VisionProfile()
    decoder: DecoderProfile = DecoderProfile()


class ExportConfig(Frozen):
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    opset: int = Field(19, ge=19)
    fp32_vision_blocks: tuple[Annotated[int, Field(ge=0)], ...] = ()  # ViT blocks found unsafe in FP16
    sample_image: HW = (224, 224)  # the shape traced at export; parity uses other shapes
    sample_prompt_len: int = Field(16, ge=2)


class CalibrationConfig(Frozen):
    source: Literal["synthetic", "folder"] = "synthetic"
    images: Path | None = None  # folder of images (source: folder)
    prompts: Path | None = None  # JSONL of {"prompt": ..., "image": optional file name}
    samples: int = Field(8, ge=1)
    image_sizes: HWs = ((224, 224),)
    prompt_len: int = Field(32, ge=4)  # prefill length, so decoder matmuls are not GEMVs
    method: Literal["max", "percentile", "entropy", "mse"] = "max"
    percentile: float = Field(99.99, gt=50, le=100)
    seed: int = Field(1234, ge=0)  # numpy's generators take non-negative seeds

    _p = field_validator("images", "prompts", mode="before")(resolve_path)

    @field_validator("images", "prompts")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None or info.data.get("source") != "folder":
            return v
        want = "folder of images" if info.field_name == "images" else "JSONL file of prompts"
        ok = v.is_dir() if info.field_name == "images" else v.is_file()
        if not ok:
            what = "does not exist" if not v.exists() else f"is not a {want.split()[0]}"
            raise ValueError(f"{v} {what} (expected a {want} for calibration.source: folder)")
        return v

    @model_validator(mode="after")
    def _folder(self) -> CalibrationConfig:
        # prompts: for a model with a decoder only (pipeline.config_checks knows which models have one)
        if self.source == "folder" and self.images is None:
            raise ValueError("calibration.source: folder needs calibration.images (and, for a model with a "
                             "decoder, calibration.prompts)")
        return self


class GraphQuant(Frozen):
    keep_high_precision: tuple[str, ...] = ()  # glob patterns on node names (e.g. "*q_proj*")
    int4_block: Literal[64, 128] = 128
    # The cosine the mixed-precision fallback keeps on calibration data: "gate" (default) aims a
    # little inside the graph's quantize gate, so a build meets its gate by keeping the most
    # harmful layer groups in high precision; a number sets it; "off" (or null) quantizes
    # everything the rules allow and lets the gate fail the build.
    accuracy_budget: float | Literal["gate", "off"] | None = "gate"
    # Attention BMMs: "projections" quantizes only the q/k/v/o projections (keeps TensorRT's fused
    # MHA, docs/FIELD_NOTES.md §1); "fp8-mha" also quantizes the FP8 MHA pattern (fp8 graphs only; measure it).
    attention: Literal["projections", "fp8-mha"] = "projections"

    @field_validator("accuracy_budget", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any) -> Any:
        """YAML reads a bare ``off`` / ``on`` as a boolean: the user meant the words."""
        return {False: "off", True: "gate"}[v] if isinstance(v, bool) else v

    @field_validator("accuracy_budget")
    @classmethod
    def _budget(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"expected a cosine in (0, 1], \"gate\" or \"off\", got {v}")
        return v


class QuantizeConfig(Frozen):
    vision: GraphQuant = GraphQuant()
    decoder: GraphQuant = GraphQuant()


class PrecisionPolicy(Frozen):
    vision: Precision = "best"
    decoder: Precision = "best"
    # the decoder's KV cache as the engine keeps it between steps: fp16 (the graph's own type),
    # or int8 / fp8 (fp8 where the SM has it), half the bytes per token, parity-gated through
    # the cache (verify's generation row reads the generated tokens' logits through it)
    kv_cache: Literal["fp16", "int8", "fp8"] = "fp16"


class FuseConfig(Frozen):
    fold_batchnorm: bool = True
    attention: Literal["auto", "onnx-attention", "canonical", "off"] = "auto"
    cleanup: bool = True


class EngineConfig(Frozen):
    workspace_mb: int = Field(1024, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = True
    hardware_compatible: bool = False
    version_compatible: bool = False
    weight_stripped: bool = False


class PackageConfig(Frozen):
    onnx: bool = True  # ship the graphs (the onnxruntime backend and the refit source) beside the engines


class Gate(Frozen):
    cosine: float = Field(0.99, ge=-1, le=1)
    rel_l2: float | None = None
    max_abs: float | None = None
    norm_ratio: float | None = 0.25  # |‖out‖/‖ref‖ − 1| at most
    # next-token agreement (decoder prefill; the vision graph's effect on the reference decoder),
    # and greedy generation agreement: shares of the *decisive* positions, those whose reference
    # lead exceeds twice the unquantized export's measured logit error
    top1: float | None = None
    tokens: float | None = None
    kl: float | None = None  # mean KL(reference || with the quantized vision features), nats


def _default_gates() -> dict[str, Gate]:
    return {
        "export": Gate(cosine=0.9999, tokens=1.0, top1=1.0),
        "fp16": Gate(cosine=0.9999),
        # what the user sees, on by default: 85 % of the decisive next tokens and three in four
        # decisive generated tokens kept (the vision graph through the reference decoder too: up
        # to its first change), and its mean KL. Two held-out samples give ~100 decisive
        # positions on the tiny model: a 0.9 gate failed on one flip the search could not see
        "int8": Gate(cosine=0.99, top1=0.85, tokens=0.75, kl=0.05),
        "fp8": Gate(cosine=0.99, top1=0.85, tokens=0.75, kl=0.05),
        "int4-weight": Gate(cosine=0.98, top1=0.8, tokens=0.7, kl=0.1),
    }


class VerifyConfig(Frozen):
    samples: int = Field(2, ge=1)
    image_sizes: HWs = ((112, 168), (196, 140))  # not the export sample's shape
    # real held-out data: a folder of images (its first `samples` files, sorted; none of them a
    # calibration image) and, for a model with a decoder, a JSONL of prompts (else word prompts)
    images: Path | None = None
    prompts: Path | None = None
    prompt_len: int = Field(24, ge=2)
    generate_tokens: int = Field(16, ge=1)
    drilldown: Literal["on-failure", "always", "never"] = "on-failure"
    seed: int = Field(4321, ge=0)  # numpy's generators take non-negative seeds

    _p = field_validator("images", "prompts", mode="before")(resolve_path)

    @field_validator("images", "prompts")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        want = "folder of images" if info.field_name == "images" else "JSONL file of prompts"
        if v is not None and not (v.is_dir() if info.field_name == "images" else v.is_file()):
            what = "does not exist" if not v.exists() else f"is not a {want.split()[0]}"
            raise ValueError(f"{v} {what} (expected a {want} for the held-out set)")
        return v


class BuildConfig(Frozen):
    name: str
    model: ModelConfig
    targets: tuple[str, ...] = Field(min_length=1)
    precision: PrecisionPolicy = PrecisionPolicy()
    export: ExportConfig = ExportConfig()
    profiles: Profiles = Profiles()
    calibration: CalibrationConfig = CalibrationConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    fuse: FuseConfig = FuseConfig()
    engine: EngineConfig = EngineConfig()
    gates: dict[Annotated[str, Field(pattern=r"^(export|fp16|int8|fp8|int4-weight)$")], Gate] = Field(
        default_factory=_default_gates
    )
    verify: VerifyConfig = VerifyConfig()
    package: PackageConfig = PackageConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not BUILD_NAME.fullmatch(v):
            raise ValueError(f"expected {BUILD_NAME_RULE}, got {v!r}")
        return v

    @field_validator("gates", mode="before")
    @classmethod
    def _merge_gates(cls, v: Any) -> Any:
        # Gates named in the YAML override the defaults one precision at a time.
        if isinstance(v, dict):
            merged: dict[str, Any] = {k: g.model_dump() for k, g in _default_gates().items()}
            for k, g in v.items():
                merged[k] = {**merged.get(k, {}), **(g or {})} if isinstance(g, dict) else g
            return merged
        return v
