"""Build one engine without a timing cache and with a warm one; print the times side by side.

    python bench/timing_cache.py                       # TensorRT-RTX, SM 8.9, a 4-block MHA+MLP graph
    python bench/timing_cache.py --builder tensorrt --sm 9.0   # on a GPU host with full TensorRT
    python bench/timing_cache.py --onnx decoder.onnx --io-spec decoder.json --graph decoder

Runs are interleaved (none, warm, none, warm, ...) after one discarded warm-up build, so library
loading and in-process caches favour neither side; the median of --repeat runs is reported.
TensorRT-RTX (>= 1.2) documents its timing-cache calls as no-ops: the cache is attached anyway
here (`timing_cache_on_rtx`) so that claim is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builder", default="tensorrt-rtx", choices=["tensorrt-rtx", "tensorrt"])
    ap.add_argument("--sm", default="8.9")
    ap.add_argument("--mode", default="int8", choices=["fp16", "int8", "fp8"])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--onnx", type=Path, help="build this graph instead of the generated one")
    ap.add_argument("--io-spec", type=Path, help="its io spec JSON (axis names → profile from the defaults)")
    ap.add_argument("--graph", default="decoder", choices=["vision", "decoder", "embed"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from pipeline.config import Profiles
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.profiles import profile_for
    from tests import trt_probe_graphs as G

    backend = resolve_backend(args.builder, args.sm)
    work = Path(tempfile.mkdtemp(prefix="vlmforge-tc-"))
    if args.onnx:
        onnx_path = args.onnx
        spec = json.loads(args.io_spec.read_text()) if args.io_spec else {}
        profile = profile_for(args.graph, spec, Profiles().model_dump(mode="json"))
    else:
        onnx_path = G.mha_mlp(work / "bench.onnx", args.mode, dim=args.dim, blocks=args.blocks)
        profile = {"x": ((1, 16, args.dim), (1, 256, args.dim), (2, 1024, args.dim))}
    cache_dir = work / "timing-caches"

    def build(cached: bool) -> tuple[float, dict | None]:  # type: ignore[type-arg]
        opts = BuildOptions(timing_cache_dir=cache_dir if cached else None, target_name=f"bench-sm{args.sm}",
                            timing_cache_on_rtx=True)
        r = build_engine(backend, onnx_path, work / "bench.engine", args.sm, profile, opts)
        return r.seconds, r.timing_cache

    first, cold = build(True)  # fills the cache; also the discarded warm-up of the process
    none_t, warm_t, loaded = [], [], 0
    for _ in range(args.repeat):
        none_t.append(build(False)[0])
        t, tc = build(True)
        warm_t.append(t)
        loaded = (tc or {}).get("loaded_bytes", 0)
    n, w = statistics.median(none_t), statistics.median(warm_t)
    print(f"builder {backend.name} {backend.version}, SM {args.sm}, graph {onnx_path.name}, {args.repeat} runs each")
    print(f"{'build':<28}{'seconds (median)':>18}{'runs':>30}")
    print(f"{'cold (fills the cache)':<28}{first:>18.3f}{'':>30}")
    print(f"{'no timing cache':<28}{n:>18.3f}{' '.join(f'{x:.3f}' for x in none_t):>30}")
    print(f"{'warm timing cache':<28}{w:>18.3f}{' '.join(f'{x:.3f}' for x in warm_t):>30}")
    print(f"speed-up with a warm cache: {n / w:.2f}x   (cache file: {loaded} bytes loaded, "
          f"{(cold or {}).get('saved_bytes', 0)} written by the cold build)")
    if backend.aot:
        print("note: TensorRT-RTX compiles without host-side tactic timing and documents its timing-cache "
              "calls as no-ops; a ratio near 1.0 (and a cache that stays a bare header) is the expected result. "
              "Run with --builder tensorrt on a GPU host for the full-TensorRT effect.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
