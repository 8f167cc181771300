"""Export memory of a ~1B-parameter generated Qwen-VL checkpoint: peak RSS / weight bytes.

    .venv/bin/python bench/export_memory.py [--family qwen2_5_vl] [--dtype fp16] [--work DIR]

Generates (once, cached in --work) a random-weight ~1B configuration stored in BF16 like the
released checkpoints, then exports each graph in a fresh child process (so each peak RSS is
that export's alone) and prints per graph: weight bytes in the export dtype, peak RSS, the
ratio (goal <= 1.5), the ratio net of the interpreter + torch/transformers import baseline,
and export seconds. Parity is not part of this measure (the stages run it separately, with
the FP32 reference loaded after the export copy is released).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss() -> int:
    """This process image's peak RSS in bytes: ``pipeline.worker.peak_rss_mb``, whose VmHWM
    starts afresh at exec (the parent that starts each child may have just generated the 1B
    checkpoint; ru_maxrss would report that peak). ``children=False``: this export's alone."""
    from pipeline.worker import peak_rss_mb

    return round(peak_rss_mb(children=False) * 2**20)


def child(graph: str, ckpt: Path, out: Path, dtype: str) -> dict[str, object]:
    """Runs in its own process: import, note the baseline, export one graph."""
    import importlib

    import onnx  # noqa: F401 - the libraries are the fixed baseline every export pays
    import onnxscript  # noqa: F401
    import torch.onnx  # noqa: F401
    import transformers  # noqa: F401

    from stages.lib.checkpoints.local import VISION_CLASSES, detect_family

    family = detect_family(ckpt)
    importlib.import_module(VISION_CLASSES[family][0])  # the family's modeling code: ~0.1 GB, fixed
    baseline = _rss()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if graph == "vision":
        from stages.lib.export.vision import export_graph

        params = {"dtype": dtype, "opset": 19, "fp32_vision_blocks": [], "sample_image": [224, 224], "seed": 0}
        facts = export_graph(out, ckpt, family, params)
        weight_bytes = int(facts["weight_bytes"])
    else:
        from stages.lib.export import decoder as dx
        from stages.lib.export.decoder_load import load_decoder
        from stages.lib.hostside.text import TextSpec

        # what the export_decoder stage does: stream only the language model's tensors (no ViT,
        # no from_pretrained dtype-conversion copy)
        model = load_decoder(ckpt, dtype=dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        n_deep = TextSpec.from_config(family, model.config).deepstack_layers
        dx.export_decoder_graph(model, family, n_deep, out / "decoder.onnx", dtype, 19,
                                {"batch": 2, "seq": 16, "past": 8})
    seconds = time.perf_counter() - t0
    onnx_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"graph": graph, "family": family, "dtype": dtype, "weight_bytes": weight_bytes, "peak_rss": _rss(),
            "baseline_rss": baseline, "export_seconds": round(seconds, 1), "onnx_bytes": onnx_bytes}


def _decoder_available() -> bool:
    try:
        from stages.lib.export import decoder as decoder_export  # noqa: F401
        from stages.lib.hostside.text import TextSpec  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench" / "export_memory")
    ap.add_argument("--graphs", default="vision,decoder")
    ap.add_argument("--child", nargs=2, metavar=("GRAPH", "CKPT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), a.work / f"out_{a.child[0]}", a.dtype)))
        return 0

    ckpt = a.work / f"ckpt_{a.family}_1b"
    if not (ckpt / "config.json").is_file():
        from stages.lib.checkpoints.tiny import generate_tiny

        t0 = time.perf_counter()
        generate_tiny(a.family, ckpt, seed=0, scale="1b", dtype="bf16")
        print(f"generated {ckpt} in {time.perf_counter() - t0:.0f} s")
    from safetensors import safe_open

    from stages.lib.checkpoints.local import weight_files

    n_params = 0
    for shard in weight_files(ckpt):
        with safe_open(str(shard), framework="pt") as f:
            n_params += sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"checkpoint: {a.family}, {n_params / 1e9:.2f} B parameters")
    graphs = a.graphs.split(",")
    if "decoder" in graphs and not _decoder_available():
        print("decoder exporter not available: measuring vision only")
        graphs = [g for g in graphs if g != "decoder"]
    rows = []
    for g in graphs:
        r = subprocess.run([sys.executable, __file__, "--child", g, str(ckpt), "--dtype", a.dtype, "--work", str(a.work)],
                           capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            print(f"{g}: export failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'graph':8} {'weights GB':>10} {'peak RSS GB':>11} {'ratio':>6} {'net ratio':>9} {'export s':>8} {'onnx GB':>8}")
    for r in rows:
        w, peak, base = r["weight_bytes"], r["peak_rss"], r["baseline_rss"]
        print(f"{r['graph']:8} {w / 1e9:10.2f} {peak / 1e9:11.2f} {peak / w:6.2f} {(peak - base) / w:9.2f} "
              f"{r['export_seconds']:8.1f} {r['onnx_bytes'] / 1e9:8.2f}")
    print("goal: peak RSS / weight bytes <= 1.5 (net ratio: minus the import baseline of the process)")
    return 0


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    raise SystemExit(main())
