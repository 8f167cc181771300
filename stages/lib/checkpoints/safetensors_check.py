"""Cheap structural checks of safetensors shards: the 8-byte header length and the JSON header
only (no tensor data is read), so a truncated download, trailing garbage or a foreign file is
refused with one line naming the shard, at plan time, before anything loads it.

Layout (https://github.com/huggingface/safetensors): ``u64 little-endian n`` | ``n`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}`` | the
data area, whose size is the largest ``end`` exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.dtypes import SAFETENSORS

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own cap


@dataclass(frozen=True)
class Header:
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    data_start: int  # 8 + header length: where the data area begins
    data_bytes: int  # the data area's size the header describes (largest end offset)


def _bad(shard: Path, why: str) -> StageError:
    return StageError(f"{shard}: not a safetensors file (bad header: {why})")


def truncated(shard: Path, want: int, have: int) -> StageError:
    return StageError(f"{shard}: truncated safetensors file (header says {want} data bytes, file has {have})")


def _entry(shard: Path, name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise _bad(shard, f"tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS:
        raise _bad(shard, f"tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(SAFETENSORS)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(shard, f"tensor {name!r} has shape {shape!r}, expected a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(shard, f"tensor {name!r} has data_offsets {offsets!r}, expected [start, end]")
    start, end = offsets
    span = math.prod(shape) * SAFETENSORS[dtype][1]
    if end - start != span:
        raise _bad(shard, f"tensor {name!r} spans {end - start} bytes, its shape {shape} of {dtype} needs {span}")
    return start, end


def read_header(shard: str | Path) -> Header:
    """The shard's parsed, checked header. Raises StageError (one line) on any inconsistency,
    including a file whose size is not exactly header + the data area the header describes."""
    shard = Path(shard)
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(shard, f"the file is {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise _bad(shard, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _bad(shard, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise StageError(f"{shard}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(shard, f"not JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(header, dict):
        raise _bad(shard, "expected a JSON object")
    area = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((_entry(shard, k, v)[1] for k, v in tensors.items()), default=0)
    if end > area:
        raise truncated(shard, end, area)
    if end < area:
        raise _bad(shard, f"it describes {end} data bytes but the file has {area}: {area - end} trailing bytes")
    return Header(tensors, 8 + n, end)


def check_index(index: Path, weight_map: Any, shard_names: dict[str, set[str]]) -> None:
    """Every ``weight_map`` entry names a tensor that its shard's header has."""
    for tensor, shard in weight_map.items():
        if tensor not in shard_names[shard]:
            raise StageError(f"{index}: weight_map puts tensor {tensor!r} in {shard}, which has no such tensor")
