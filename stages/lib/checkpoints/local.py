"""Local Hugging Face checkpoints: detect the family, validate files, load.

Nothing here downloads: a checkpoint is a local folder (``config.json``, safetensors shards,
tokenizer and preprocessor files). Weights are only ever read from safetensors, never from a
pickle (``.bin``/``.pt``): unpickling a checkpoint runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import StageError
from stages.lib.checkpoints import safetensors_check as st

# ROLES, file_role and the hf_load loaders are re-exported: stages import the checkpoint API from here
from stages.lib.checkpoints.files import ROLES, checkpoint_files, file_role, read_config  # noqa: F401
from stages.lib.checkpoints.hf_load import (  # noqa: F401
    check_remote_code,
    from_pretrained,
    hf_kwargs,
    load_config_hf,
    load_image_processor,
    load_processor,
    load_tokenizer,
)
from stages.lib.dtypes import torch_dtype, torch_of_safetensors

if TYPE_CHECKING:
    import torch

# model_type in config.json -> family; architectures[] names are accepted as a fallback.
VLM_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
# Vision-only families (a CNN backbone exported by stages/lib/export/cnn.py).
VISION_ONLY_FAMILIES: dict[str, str] = {"resnet": "ResNetForImageClassification"}
FAMILIES = {**VLM_FAMILIES, **VISION_ONLY_FAMILIES}
# model.vision_onnx alone: the user's ONNX is the model, there is no checkpoint folder
BYO_FAMILY = "byo"
_BY_ARCH = {arch: fam for fam, arch in FAMILIES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _supported() -> str:
    return ", ".join(FAMILIES)


def detect_family(path: str | Path) -> str:
    """The family named by config.json (``model_type`` first, then ``architectures``)."""
    cfg = read_config(path)
    model_type = str(cfg.get("model_type", ""))
    if model_type in FAMILIES:
        return model_type
    for arch in cfg.get("architectures") or []:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    what = model_type or ",".join(map(str, cfg.get("architectures") or [])) or "no model_type"
    raise StageError(f"unsupported checkpoint {path} (config.json says {what}); supported families: {_supported()}")


def _index_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{index}: not valid JSON ({str(e).splitlines()[0]})") from None
    weight_map = data.get("weight_map", {}) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise StageError(f"{index}: expected a weight_map of tensor name -> shard file name")
    if not weight_map:
        raise StageError(f"{index} names no weight shards")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise StageError(f"{index}: shard {shard!r} is not a file name in the checkpoint folder")
    return weight_map


def validate_checkpoint(path: str | Path) -> list[Path]:
    """Check that the checkpoint is complete and loadable without pickle, reading only the
    shards' headers (sizes, dtypes, offsets; see safetensors_check); return its files."""
    root = Path(path)
    if not root.is_dir():
        raise StageError(f"checkpoint {root} does not exist (expected a local Hugging Face checkpoint folder)")
    read_config(root)
    files = checkpoint_files(root)
    index = root / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index.is_file():
        weight_map = _index_map(index)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (root / shard).is_file():
                raise StageError(f"checkpoint {root} is missing shard {shard} (named by {index.name})")
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise StageError(
                    f"checkpoint {root} has only pickle weights ({', '.join(pickles[:3])}); refusing to unpickle "
                    "untrusted files, convert them to safetensors"
                )
            raise StageError(f"checkpoint {root} has no *.safetensors weights")
    names = {shard: set(st.read_header(root / shard).tensors) for shard in shards}
    if weight_map:
        st.check_index(index, weight_map, names)
    return files


def preflight_checkpoint(path: str | Path, trust_remote_code: bool = False) -> None:
    """Plan-time check of a user checkpoint, headers only (cheap): the folder, config.json, a
    supported family, the symlink rule, complete safetensors shards and the remote-code policy.
    Raises StageError with one line naming the file and what was expected."""
    if not Path(path).is_dir():
        raise StageError(f"checkpoint {path} does not exist (expected a local Hugging Face checkpoint folder)")
    detect_family(path)  # first: an unsupported model is the news, whatever else it lacks
    validate_checkpoint(path)
    check_remote_code(path, trust_remote_code)


def resolve_checkpoint(folder: str | Path) -> tuple[Path, str]:
    """Read ``checkpoint.json`` from a checkpoint stage's output folder: (model path, family)."""
    folder = Path(folder)
    meta_file = folder / "checkpoint.json"
    if not meta_file.is_file():
        raise StageError(f"{folder} has no checkpoint.json (is it a checkpoint stage output?)")
    meta = json.loads(meta_file.read_text())
    if meta.get("path") is None:
        raise StageError(f"{folder}: no checkpoint (family {meta.get('family')}: a bring-your-own ONNX build "
                         "has no weights to load); check checkpoint_family() first")
    p = Path(meta["path"])
    return (p if p.is_absolute() else folder / p), str(meta["family"])


def checkpoint_family(folder: str | Path) -> str:
    """The family in a checkpoint stage's ``checkpoint.json`` without resolving a path
    (``byo`` has none)."""
    meta_file = Path(folder) / "checkpoint.json"
    if not meta_file.is_file():
        raise StageError(f"{folder} has no checkpoint.json (is it a checkpoint stage output?)")
    return str(json.loads(meta_file.read_text())["family"])


def model_class(family: str) -> Any:
    import transformers

    if family not in FAMILIES:
        raise StageError(f"unsupported family {family!r}; supported families: {_supported()}")
    return getattr(transformers, FAMILIES[family])


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False) -> Any:
    """Load the family's model class from safetensors only, in eval mode."""
    import torch

    path = Path(path)
    family = detect_family(path)
    validate_checkpoint(path)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    cls = model_class(family)
    # Eager attention: deterministic on CPU and the reference the exported graph must match.
    model = from_pretrained(cls, path, "model", trust_remote_code, dtype=dtype or torch.float32,
                            use_safetensors=True, attn_implementation="eager")
    return model.eval()


VISION_CLASSES = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
}
_VISION_PREFIXES = ("model.visual.", "visual.")  # transformers 5 layout, then the original hub one


def weight_files(path: str | Path) -> list[Path]:
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / s for s in sorted(set(_index_map(index).values()))]
    return sorted(root.glob("*.safetensors"))


def read_safetensors(path: str | Path, prefixes: tuple[str, ...], dtype: torch.dtype) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor in ``dtype``) for the tensors whose name starts with one of ``prefixes``.

    Plain reads, not ``safe_open``'s mmap: mapped file pages count in the process's RSS until
    unmapped, which doubled the peak of a streamed load (measured: 2x the weights). Each tensor is
    read into one reusable buffer and copied out once, converted to ``dtype``. Each header is
    checked first (``safetensors_check``), and a short read (a file cut while being read)
    raises StageError: stale bytes of the reused buffer are never yielded.
    """
    import torch

    scratch = bytearray(0)  # one reusable read buffer: no heap fragmentation from per-tensor buffers
    for shard in weight_files(path):
        header = st.read_header(shard)
        base = header.data_start
        with open(shard, "rb") as f:
            entries = sorted((v["data_offsets"][0], k, v) for k, v in header.tensors.items())
            for _, name, info in entries:
                if not name.startswith(prefixes):
                    continue
                start, end = info["data_offsets"]
                src = torch_of_safetensors(info["dtype"])
                if end == start:
                    yield name, torch.empty(info["shape"], dtype=src)
                    continue
                if len(scratch) < end - start:
                    scratch = bytearray(end - start)
                f.seek(base + start)
                got = f.readinto(memoryview(scratch)[: end - start])
                if got != end - start:
                    raise st.truncated(shard, header.data_bytes, start + (got or 0))
                t = torch.frombuffer(scratch, dtype=src, count=(end - start) // src.itemsize).reshape(info["shape"])
                same = not t.is_floating_point() or t.dtype == dtype
                yield name, (t.clone() if same else t.to(dtype))


def load_vision(path: str | Path, family: str, dtype: torch.dtype | None = None,
                trust_remote_code: bool = False) -> Any:
    """The vision encoder alone, its weights streamed tensor by tensor from the shards.

    Loading the whole VLM to export its ViT would hold the decoder too (GBs); here the
    encoder is built on the meta device and only ``*visual.*`` tensors are read, each
    converted to ``dtype`` as it is read: peak memory is one copy of the encoder's weights.
    """
    import importlib

    import torch

    validate_checkpoint(path)
    dtype = dtype or torch.float32
    config = load_config_hf(path, trust_remote_code)
    vcfg = config.vision_config
    vcfg._attn_implementation = "eager"
    mod_name, cls_name = VISION_CLASSES[family]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    with torch.device("meta"):
        visual = cls._from_config(vcfg, dtype=dtype)
    state = {key[len(prefix):]: t for key, t in read_safetensors(path, _VISION_PREFIXES, dtype)
             for prefix in _VISION_PREFIXES if key.startswith(prefix)}
    missing, unexpected = visual.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise StageError(f"checkpoint {path}: vision weights do not match the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on CPU.
    for name, buf in list(visual.named_buffers()):
        if buf.is_meta:
            owner = visual.get_submodule(name.rsplit(".", 1)[0]) if "." in name else visual
            fresh = type(owner)(owner.config) if hasattr(owner, "config") else None
            if fresh is None:
                raise StageError(f"cannot materialise buffer {name} of the vision encoder")
            owner.load_state_dict(fresh.state_dict(), strict=False)
            for bname, b in fresh.named_buffers(recurse=False):
                setattr(owner, bname, b)
    return visual.eval()
