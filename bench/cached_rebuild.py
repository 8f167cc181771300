"""A rebuild of an unchanged big checkpoint must not re-read it: time a cold and a warm build.

    python bench/cached_rebuild.py               # a tiny Qwen2.5-VL plus a 17 GB (sparse) shard
    python bench/cached_rebuild.py --gb 4 --until checkpoint

The checkpoint is a generated tiny model with one more safetensors shard holding a single
``pad`` tensor of ``--gb`` GB (a sparse file: no disk is used, but hashing reads every byte).
The cold build hashes it once; the warm build and `plan` find every digest in the stat memo.
Prints seconds side by side and the ratio, all in one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sparse_shard(path: Path, nbytes: int) -> None:
    header = json.dumps({"pad": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.truncate(8 + len(header) + nbytes)


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=17.0)
    ap.add_argument("--until", default="export_vision")
    a = ap.parse_args()
    from stages.lib.checkpoints.tiny import generate_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "ckpt"
        generate_tiny("qwen2_5_vl", ckpt)
        nbytes = int(a.gb * 1e9)
        sparse_shard(ckpt / "zz-pad.safetensors", nbytes)
        cfg = root / "big.yaml"
        cfg.write_text(f"name: big\nmodel: {{checkpoint: {ckpt}}}\ntargets: [rtx4090]\n")
        env = {**os.environ, "VLMFORGE_ARTIFACTS": str(root / "artifacts"), "PYTHONPATH": str(REPO)}
        build = ["build", str(cfg), "--until", a.until]
        cold = timed(build, env)
        warm = timed(build, env)
        plan = timed(["plan", str(cfg)], env)
        size = sum(p.stat().st_size for p in ckpt.iterdir())
    print(f"checkpoint: {size / 1e9:.1f} GB (sparse pad shard {nbytes / 1e9:.1f} GB); build --until {a.until}")
    print(f"| run | seconds |\n|---|---|\n| cold build (hashes everything) | {cold:.2f} |\n"
          f"| warm build (all cached) | {warm:.2f} |\n| plan (all cached) | {plan:.2f} |")
    print(f"warm / cold = {warm / cold:.3f}; warm build under 3 s: {'yes' if warm < 3 else 'NO'}")
    return 0 if warm < 3 else 1


if __name__ == "__main__":
    sys.exit(main())
