"""Typed, frozen build configuration loaded from YAML (unknown keys are errors).

Each section belongs to one stage family; a stage's ``params`` function picks the fields it
uses, so editing one section re-keys only the stages that read it. Relative paths resolve
against the folder of the YAML file that names them (as DVC does), never the CWD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.errors import ConfigError

Precision = Literal["best", "fp8", "int8", "int4-weight", "fp16"]
Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
HW = tuple[int, int]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _resolve(v: Any, info: ValidationInfo) -> Any:
    if v is None:
        return None
    base = (info.context or {}).get("base_dir")
    p = Path(v).expanduser()
    return (Path(base) / p).resolve() if base and not p.is_absolute() else p


class OnnxGraphSource(Frozen):
    """Bring your own ONNX: an existing FP32 graph replaces the exported one."""

    path: Path
    input_name: str = "pixel_values"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    resize: HW = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    _p = field_validator("path", mode="before")(_resolve)

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

    _p = field_validator("checkpoint", mode="before")(_resolve)

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
    past: MinOptMax = MinOptMax(min=0, opt=64, max=256)


class Profiles(Frozen):
    vision: VisionProfile = VisionProfile()
    decoder: DecoderProfile = DecoderProfile()


class ExportConfig(Frozen):
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    opset: int = Field(19, ge=19)
    fp32_vision_blocks: tuple[int, ...] = ()  # ViT blocks found unsafe in FP16
    sample_image: HW = (224, 224)  # the shape traced at export; parity uses other shapes
    sample_prompt_len: int = Field(16, ge=2)


class CalibrationConfig(Frozen):
    source: Literal["synthetic", "folder"] = "synthetic"
    images: Path | None = None  # folder of images (source: folder)
    prompts: Path | None = None  # JSONL of {"prompt": ..., "image": optional file name}
    samples: int = Field(8, ge=1)
    image_sizes: tuple[HW, ...] = ((224, 224),)
    prompt_len: int = Field(32, ge=4)  # prefill length, so decoder matmuls are not GEMVs
    method: Literal["max", "percentile", "entropy", "mse"] = "max"
    percentile: float = Field(99.99, gt=50, le=100)
    seed: int = 1234

    _p = field_validator("images", "prompts", mode="before")(_resolve)

    @model_validator(mode="after")
    def _folder(self) -> CalibrationConfig:
        if self.source == "folder" and (self.images is None or self.prompts is None):
            raise ValueError("calibration.source: folder needs calibration.images and calibration.prompts")
        return self


class GraphQuant(Frozen):
    keep_high_precision: tuple[str, ...] = ()  # glob patterns on node names (e.g. "*q_proj*")
    int4_block: Literal[64, 128] = 128
    accuracy_budget: float | None = Field(None, gt=0, le=1)  # cosine the sensitivity pass must keep
    # Attention BMMs: "projections" quantizes only the q/k/v/o projections (keeps TensorRT's fused
    # MHA, NOTES §1); "fp8-mha" also quantizes the FP8 MHA pattern (fp8 graphs only; measure it).
    attention: Literal["projections", "fp8-mha"] = "projections"


class QuantizeConfig(Frozen):
    vision: GraphQuant = GraphQuant()
    decoder: GraphQuant = GraphQuant()


class PrecisionPolicy(Frozen):
    vision: Precision = "best"
    decoder: Precision = "best"


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


class Gate(Frozen):
    cosine: float = Field(0.99, ge=-1, le=1)
    rel_l2: float | None = None
    max_abs: float | None = None
    norm_ratio: float | None = 0.25  # |‖out‖/‖ref‖ − 1| at most
    top1: float | None = None  # decoder next-token agreement
    tokens: float | None = None  # greedy generation agreement (share of tokens)


def _default_gates() -> dict[str, Gate]:
    return {
        "export": Gate(cosine=0.9999, tokens=1.0, top1=1.0),
        "fp16": Gate(cosine=0.9999),
        "int8": Gate(cosine=0.99),
        "fp8": Gate(cosine=0.99),
        "int4-weight": Gate(cosine=0.98),
    }


class VerifyConfig(Frozen):
    samples: int = Field(2, ge=1)
    image_sizes: tuple[HW, ...] = ((112, 168), (196, 140))  # not the export sample's shape
    prompt_len: int = Field(24, ge=2)
    generate_tokens: int = Field(16, ge=1)
    drilldown: Literal["on-failure", "always", "never"] = "on-failure"
    seed: int = 4321


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


# --- loading -------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    import yaml

    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    includes = data.pop("include", [])
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, _read_yaml((path.parent / inc).resolve(), (*seen, path)))
    return _deep_merge(merged, data)


def _format_error(path: Path, err: Any) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"].startswith(("literal", "int", "float", "bool", "string")):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{path}: " + "; ".join(parts)


def load_config(path: str | Path) -> BuildConfig:
    from pydantic import ValidationError

    path = Path(path).resolve()
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    try:
        cfg = BuildConfig.model_validate(data, context={"base_dir": str(path.parent)})
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None
    _check_image_sizes(cfg, path)
    return cfg


def _check_image_sizes(cfg: BuildConfig, path: Path) -> None:
    """Every image size the build will feed must fit the vision engine's profile: refuse before
    an hour of exporting finds out (the export stage checks again for its own inputs)."""
    vp = cfg.profiles.vision
    lo, hi = vp.min_image, vp.max_image
    if not (lo[0] <= vp.opt_image[0] <= hi[0] and lo[1] <= vp.opt_image[1] <= hi[1]):
        raise ConfigError(f"{path}: profiles.vision: expected min_image <= opt_image <= max_image, got {lo}/{vp.opt_image}/{hi}")
    sizes = [("export.sample_image", cfg.export.sample_image)]
    sizes += [(f"calibration.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.calibration.image_sizes)]
    sizes += [(f"verify.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.verify.image_sizes)]
    for where, (h, w) in sizes:
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            raise ConfigError(
                f"{path}: {where}: image {h}x{w} is outside the vision profile "
                f"(profiles.vision min_image {lo[0]}x{lo[1]}, max_image {hi[0]}x{hi[1]})"
            )
