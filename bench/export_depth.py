"""Decoder export time and memory against depth: stamped (decoder_stamp) vs one whole trace.

    .venv/bin/python bench/export_depth.py [--layers 4,12,36] [--hidden 256] [--repeats 1] [--work DIR]
    .venv/bin/python bench/export_depth.py --layers 28 --hidden 1536 --intermediate 8960 --modes stamp

Generates (once, cached in --work) random BF16 Qwen2.5-VL checkpoints of small width and the real
151936-token vocab at each depth, then exports each decoder to FP16 in a fresh child process per
run (so each peak RSS is that export's alone), stamp and trace alternating so that a noisy
neighbour slows both alike. Per depth and mode it prints the median seconds (checkpoint read,
export, save and finalize_graph: what the stage pays for decoder.onnx), the peak RSS, the FP16
weight bytes, and the trace/stamp ratios. Parity is not measured here (tests/test_decoder_stamp).
Below ``decoder_export.EXTERNAL_DATA_BYTES`` (256 MB) both modes save the graph inline (the whole
proto in memory, and finalize_graph reloads it), so RSS there says little about the exporters;
the second form (a ~1.8B-parameter decoder, external data) measures the stamped path's memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = {"batch": 2, "seq": 16, "past": 8}


def _rss() -> int:
    """Peak RSS of this process image in bytes (``pipeline.worker.peak_rss_mb``: VmHWM, which
    starts afresh at exec, so not the parent's peak; ``children=False``: this export's alone)."""
    from pipeline.worker import peak_rss_mb

    return round(peak_rss_mb(children=False) * 2**20)


def make_checkpoint(out: Path, layers: int, hidden: int, vocab: int, intermediate: int) -> Path:
    """A random Qwen2.5-VL checkpoint: ``layers`` text layers of width ``hidden``, a 2-block ViT."""
    import torch

    from stages.lib.checkpoints.local import model_class
    from stages.lib.checkpoints.tiny import tiny_config

    heads = max(2, hidden // 64)
    half = hidden // heads // 2
    d = tiny_config("qwen2_5_vl", vocab_size=vocab).to_dict()
    tc = d["text_config"]
    tc.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=max(1, heads // 2), initializer_range=0.02)
    tc.pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
    tc["rope_parameters"]["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    d["vision_config"]["out_hidden_size"] = hidden
    cfg = type(tiny_config("qwen2_5_vl")).from_dict(d)
    torch.manual_seed(0)
    model = model_class("qwen2_5_vl")._from_config(cfg, dtype=torch.bfloat16)  # BF16 like released ones
    model.save_pretrained(out, safe_serialization=True)
    return out


def child(mode: str, ckpt: Path, out: Path) -> dict[str, object]:
    """Runs in its own process: import, note the baseline, export decoder.onnx like the stage."""
    import onnx  # noqa: F401 - the libraries are the fixed baseline every export pays
    import onnxscript  # noqa: F401
    import torch.onnx  # noqa: F401
    import transformers  # noqa: F401

    from stages.lib.export import decoder as dx
    from stages.lib.export.decoder_graph import finalize_graph

    baseline = _rss()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "decoder.onnx"
    t0 = time.perf_counter()
    if mode == "stamp":
        from stages.lib.export.decoder_stamp import export_stamped

        facts = export_stamped(ckpt, "qwen2_5_vl", 0, path, "fp16", 19, SAMPLE)
    else:
        from stages.lib.export.decoder_load import load_decoder

        facts = dx.export_decoder_graph(load_decoder(ckpt, "fp16"), "qwen2_5_vl", 0, path, "fp16", 19, SAMPLE)
    finalize_graph(path, int(facts["layers"]), 0)
    seconds = time.perf_counter() - t0
    onnx_bytes = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("decoder.onnx"))
    return {"mode": mode, "seconds": round(seconds, 2), "peak_rss": _rss(), "baseline_rss": baseline,
            "onnx_bytes": onnx_bytes, "layers": facts["layers"]}


def _weight_bytes_fp16(ckpt: Path) -> int:
    """FP16 bytes of the decoder's tensors (the language model, lm_head), from the headers."""
    from stages.lib.checkpoints import safetensors_check as st
    from stages.lib.checkpoints.local import weight_files
    from stages.lib.export.decoder_load import _PREFIXES

    total = 0
    for shard in weight_files(ckpt):
        for name, info in st.read_header(shard).tensors.items():
            if name.startswith(_PREFIXES):
                n = 1
                for s in info["shape"]:
                    n *= s
                total += 2 * n
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,12,36")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, help="MLP width (default 2 x hidden)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--modes", default="stamp,trace")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench" / "export_depth")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return 0
    rows = []
    modes = a.modes.split(",")
    inter = a.intermediate or 2 * a.hidden
    for layers in (int(x) for x in a.layers.split(",")):
        ckpt = a.work / f"ckpt_h{a.hidden}_i{inter}_v{a.vocab}_l{layers}"
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, layers, a.hidden, a.vocab, inter)
        runs: dict[str, list[dict[str, object]]] = {m: [] for m in modes}
        for i in range(a.repeats):
            for mode in (modes if i % 2 == 0 else modes[::-1]):  # alternate the order
                r = subprocess.run([sys.executable, __file__, "--child", mode, str(ckpt), str(a.work / f"out_{mode}")],
                                   capture_output=True, text=True, cwd=REPO)
                if r.returncode != 0:
                    print(f"{layers} layers {mode}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    return 1
                runs[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"  {layers:3d} layers {mode:5}: {runs[mode][-1]['seconds']:7.1f} s", flush=True)
        rows.append((layers, _weight_bytes_fp16(ckpt), runs))
    print(f"\nhidden {a.hidden}, MLP {inter}, vocab {a.vocab}, FP16 export, median of {a.repeats} run(s) per mode")
    print(f"{'layers':>6} {'weights MB':>10} | " + " | ".join(f"{m + ' s':>7} {'RSS MB':>7} {'net/w':>5}" for m in modes)
          + (f" | {'time x':>6} {'RSS x':>6}" if len(modes) == 2 else ""))
    for layers, wbytes, runs in rows:
        med = {m: (statistics.median(float(str(r["seconds"])) for r in rs),
                   statistics.median(int(str(r["peak_rss"])) for r in rs),
                   statistics.median(int(str(r["baseline_rss"])) for r in rs)) for m, rs in runs.items()}
        line = f"{layers:6d} {wbytes / 1e6:10.1f} | " + " | ".join(
            f"{s:7.1f} {r / 1e6:7.0f} {(r - b) / wbytes:5.2f}" for s, r, b in med.values())
        if len(modes) == 2:
            (s0, r0, _), (s1, r1, _) = med[modes[0]], med[modes[1]]
            line += f" | {s1 / s0:6.2f} {r1 / r0:6.2f}"
        print(line)
    print(f"net/w: peak RSS above the import baseline over the FP16 weight bytes; time x / RSS x: {modes[-1]} "
          f"over {modes[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
