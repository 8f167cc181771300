"""The PyTorch reference of a model too big to hold: weights streamed in block by block.

Parity needs the checkpoint's own model as the reference, in FP32 (the exported and quantized
graphs are graded against it). ``from_pretrained`` of a whole 8 B VLM in FP32 is 35 GB; on a
24 GB build machine it cannot exist. Here the model is built with its parameters on the meta
device (no memory) and its buffers real (rotary ``inv_freq`` is computed, not loaded), the
small modules (norms, patch embedding, merger) are loaded once, and every *block* — each element
of a ``ModuleList`` (decoder layers, ViT blocks, deepstack mergers) and each big leaf
(``embed_tokens``, ``lm_head``) — is read from the safetensors shards in a forward pre-hook and
dropped back to meta in its forward hook. ``model(...)``, ``model.generate(...)`` and
``get_image_features`` run unchanged; peak memory is the resident modules plus one block in
FP32, whatever the depth. Block tensors are kept in their stored dtype after the first read
(``keep_bytes``): a BF16 checkpoint then costs 1x its weight bytes plus one FP32 block, and a
forward converts each block instead of re-reading it (measured in ``bench/scale.py``).

Tensor reads go straight into the tensor's own storage (``readinto``), one tensor at a time,
then convert to the compute dtype; names of the original hub layout (``model.layers.*``,
``visual.*``) are mapped to the transformers 5 module paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.dtypes import torch_dtype, torch_of_safetensors

__all__ = ["KEEP_SHARE", "STREAM_LEAF_BYTES", "load_streamed", "release_blocks", "stored_bytes"]

STREAM_LEAF_BYTES = 64 * 1024**2  # a leaf module at least this big streams (embeddings, lm_head)
KEEP_SHARE = 0.35  # of MemAvailable: what the kept blocks may take (ORT sessions and activations need the rest)
_HUB_RENAMES = (("model.embed_tokens.", "model.language_model.embed_tokens."),
                ("model.layers.", "model.language_model.layers."),
                ("model.norm.", "model.language_model.norm."),
                ("visual.", "model.visual."))


@dataclass(frozen=True)
class _Loc:
    shard: Path
    start: int  # absolute file offset
    nbytes: int
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


def _canonical(name: str) -> str:
    for old, new in _HUB_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _index(path: Path) -> dict[str, _Loc]:
    from stages.lib.checkpoints import safetensors_check as st
    from stages.lib.checkpoints.local import weight_files

    locs: dict[str, _Loc] = {}
    for shard in weight_files(path):
        header = st.read_header(shard)
        for name, info in header.tensors.items():
            start, end = info["data_offsets"]
            locs[_canonical(name)] = _Loc(shard, header.data_start + start, end - start, info["dtype"],
                                          tuple(info["shape"]))
    return locs


def _read(loc: _Loc, dtype: Any | None = None) -> Any:
    """One tensor, read into its own buffer (no mmap: mapped pages count as RSS until unmapped);
    in its stored dtype when ``dtype`` is None."""
    import torch

    src = torch_of_safetensors(loc.dtype)
    raw = torch.empty(loc.nbytes, dtype=torch.uint8)
    with open(loc.shard, "rb") as f:
        f.seek(loc.start)
        got = f.readinto(raw.numpy().data)
    if got != loc.nbytes:
        raise StageError(f"{loc.shard}: tensor data cut short ({got} of {loc.nbytes} bytes); the file changed or is truncated")
    t = raw.view(src).reshape(loc.shape)
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


class _Store:
    """Block tensors as stored (BF16 for released checkpoints), kept after their first read
    while they fit ``keep_bytes``: a forward then costs a dtype conversion per block, not a file
    read. Kept in the stored dtype, a BF16 model costs 1x its weight bytes plus one FP32 block.

    Conversions land in reused buffers, one per (name within the block, shape): blocks run one at
    a time, so layer i+1's ``q_proj`` can take layer i's buffer. Fresh FP32 allocations per call
    cost more in page faults than the matmuls (measured: sys time > user time without reuse)."""

    def __init__(self, locs: dict[str, _Loc], keep_bytes: int | None):
        self.locs, self.keep, self.used = locs, keep_bytes, 0
        self.kept: dict[_Loc, Any] = {}  # by location: tied weights are read and kept once
        self.buffers: dict[tuple[str, tuple[int, ...]], Any] = {}

    def get(self, name: str, local: str, dtype: Any) -> Any:
        loc = self.locs[name]
        t = self.kept.get(loc)
        if t is None:
            t = _read(loc)
            if self.keep is None or self.used + loc.nbytes <= self.keep:
                self.kept[loc] = t
                self.used += loc.nbytes
        if not t.is_floating_point() or t.dtype == dtype:
            return t
        buf = self.buffers.get((local, loc.shape))
        if buf is None or buf.dtype != dtype:
            buf = self.buffers[(local, loc.shape)] = t.to(dtype)
            return buf
        return buf.copy_(t)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3  # no /proc (not Linux): a conservative budget


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters on the meta device, buffers real: what accelerate's ``init_empty_weights`` does
    (accelerate is not a dependency; transformers 5 has no public equivalent)."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: Any, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _blocks(model: Any) -> list[tuple[str, Any]]:
    """(path, module) of every streamed unit: ModuleList elements and big leaves, outermost first."""
    import torch

    units: list[tuple[str, Any]] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        own = sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        if isinstance(mod, torch.nn.ModuleList):
            for i, child in enumerate(mod):
                units.append((f"{name}.{i}", child))
            taken.append(name)
        elif own >= STREAM_LEAF_BYTES:
            units.append((name, mod))
            taken.append(name)
    return units


def _to_meta(mod: Any) -> None:
    import torch

    for sub in mod.modules():
        for n, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[n] = torch.nn.Parameter(p.to("meta"), requires_grad=False)


def _loader(prefix: str, mod: Any, store: _Store, dtype: Any) -> Any:
    names = [n for n, _ in mod.named_parameters()]

    def pre_hook(module: Any, args: Any) -> None:
        state = {n: store.get(f"{prefix}.{n}", n, dtype) for n in names}
        module.load_state_dict(state, strict=False, assign=True)

    return pre_hook


def load_streamed(path: str | Path, dtype: str = "fp32", trust_remote_code: bool = False,
                  keep_bytes: int | None = -1) -> Any:
    """The family's model in eval mode, its blocks loaded on demand (see the module docstring).

    ``keep_bytes`` caps the stored-dtype block tensors kept between calls: None keeps all of them
    (1x the checkpoint's weight bytes), 0 re-reads every block on every call, and the default (-1)
    keeps up to ``KEEP_SHARE`` of the memory available when the model is loaded. The figures are
    the same either way; only the time changes. (Measured at Qwen3-VL-8B widths, 3 layers: keeping
    all 5.8 GB beside export_decoder's ORT sessions peaked at 17.3 GB.)"""
    import torch

    from stages.lib.checkpoints.hf_load import load_config_hf
    from stages.lib.checkpoints.local import detect_family, model_class, validate_checkpoint

    path = Path(path)
    family = detect_family(path)
    validate_checkpoint(path)
    tdtype = torch_dtype(dtype)
    config = load_config_hf(path, trust_remote_code)
    config._attn_implementation = "eager"  # the reference the exported graphs must match
    with _params_on_meta():
        model = model_class(family)._from_config(config, dtype=tdtype)
    locs = _index(path)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False))
    if "lm_head.weight" not in locs and tied and "model.language_model.embed_tokens.weight" in locs:
        locs["lm_head.weight"] = locs["model.language_model.embed_tokens.weight"]
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in locs]
    if missing:
        raise StageError(f"checkpoint {path}: no weights for {missing[:3]} ({len(missing)} parameters missing)")
    streamed = _blocks(model)
    in_blocks = tuple(p + "." for p, _ in streamed)
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(in_blocks):  # resident: read once
            owner, _, leaf = name.rpartition(".")
            sub = model.get_submodule(owner) if owner else model
            sub._parameters[leaf] = torch.nn.Parameter(_read(locs[name], tdtype), requires_grad=False)
    if keep_bytes is not None and keep_bytes < 0:
        keep_bytes = int(KEEP_SHARE * _available_bytes())
    store = _Store(locs, keep_bytes)
    model._vlmforge_store = store  # release_blocks' handle
    for prefix, mod in streamed:
        mod.register_forward_pre_hook(_loader(prefix, mod, store, tdtype))
        mod.register_forward_hook(lambda module, args, out: _to_meta(module))
    cls = type(model)
    # generate() asks model.device/dtype, which read the first parameter: a streamed one is on meta
    model.__class__ = type(cls.__name__, (cls,), {"device": property(lambda self: torch.device("cpu")),
                                                  "dtype": property(lambda self: tdtype)})
    model.generation_config.do_sample = False
    return model.eval()


def release_blocks(model: Any) -> None:
    """Drop a streamed model's kept block tensors and conversion buffers (a later forward reads
    them again); a model not made by :func:`load_streamed` is left as it is."""
    store = getattr(model, "_vlmforge_store", None)
    if isinstance(store, _Store):
        store.kept.clear()
        store.buffers.clear()
        store.used = 0


def stored_bytes(path: str | Path, prefix: str = "") -> int:
    """Bytes the checkpoint stores for the tensors under ``prefix`` (transformers 5 module paths,
    e.g. ``model.visual.``), read from the shard headers alone."""
    return sum(loc.nbytes for name, loc in _index(Path(path)).items() if name.startswith(prefix))
