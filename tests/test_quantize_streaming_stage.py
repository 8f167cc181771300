"""The streaming quantize path (issue 11) through the quantize stage: an external decoder-like
chain (tests/quantize_chain.py) quantized block by block, its cuts and external data kept; and
(slow) the peak memory of quantizing 512 MiB of weights, about one layer over the block runner's
own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from stages.lib.qdq import graphio
from stages.lib.segments.cuts import CUTS_KEY
from tests.quantize_chain import GQ, _ctx, calibrate, chain_feeds, decoder_chain

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4-weight"])
def test_stage_quantizes_an_external_decoder_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            mode: str) -> None:
    from stages import quantize

    monkeypatch.setattr(graphio, "EXTERNAL_DATA_BYTES", 0)  # as a big graph is saved
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=256)
    feeds = chain_feeds(256)
    calibrate(path, feeds, tmp_path / "cal")
    ctx = _ctx(path.parent, tmp_path / "cal", tmp_path / "out")
    entry, checks = quantize._quantize_graph(ctx, "decoder", mode, GQ, feeds, [{}])
    assert entry["runner"] == "segments" and entry["checker"]
    assert entry["parity"]["vs_unquantized"]["cosine"] > (0.98 if mode == "int4-weight" else 0.995)
    assert entry["weight_dq"] == (6 if mode == "int4-weight" else 7)  # int4 keeps the lm_head
    if mode == "int4-weight":
        assert entry["int4_awq"]["chosen"] in ("awq", "plain")
    assert sorted(p.name for p in ctx.out.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    bare = onnx.load(str(ctx.out / "decoder.onnx"), load_external_data=False)
    assert json.loads(next(p.value for p in bare.metadata_props if p.key == CUTS_KEY)) == ["x1", "x2", "x3"]
    assert any(t.data_location == TensorProto.EXTERNAL for t in bare.graph.initializer)


PEAK = """
import json, sys, time
from pathlib import Path


def hwm():  # peak RSS of this process in MiB
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024


import onnxruntime  # noqa: F401 - imported before the baseline: its libraries are no graph's memory
from pipeline.stage import StageContext
from stages import quantize
from stages.lib.qdq import graphio, heldout
from tests.quantize_chain import _GATES, GQ, chain_feeds

fuse, cal, out, mode, hidden = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
graphio.EXTERNAL_DATA_BYTES = 0  # written as a big graph's are, tensor by tensor (not one inline proto)
feeds = chain_feeds(hidden)
out.mkdir(parents=True)
ctx = StageContext("quantize@t", {"gates": _GATES}, {"fuse": fuse, "calibrate": cal}, out, None, [])
before, t = hwm(), time.time()
if mode == "runner":  # the block runner alone, over the unquantized graph: the floor
    heldout.run_all(fuse / "decoder.onnx", feeds, ["logits"])
    entry = {"weight_dq": 0, "parity": {"vs_unquantized": {"cosine": 1.0}}}
else:
    entry, _ = quantize._quantize_graph(ctx, "decoder", mode, GQ, feeds, [{}])
print(json.dumps({"before": before, "peak": hwm(), "seconds": time.time() - t, "weight_dq": entry["weight_dq"],
                  "cosine": entry["parity"]["vs_unquantized"]["cosine"]}))
"""


def _synthetic_ranges(path: Path, out: Path, hidden: int) -> None:
    """Made-up ranges for every value (a calibration run would cost the test its time)."""
    names = [o for n in onnx.load(str(path), load_external_data=False).graph.node for o in n.output]
    ms = np.ones(hidden, np.float32)
    ms[:8] = 50.0  # salient channels, so AWQ has something to find
    tensors = {n: {"amax": 6.0, "amax_fp8": 6.0, "shape": [1, 8, hidden]} for n in names}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranges_decoder.json").write_text(json.dumps({"order": names, "tensors": tensors}))
    np.savez(out / "ranges_decoder.npz", **{f"chan_ms_{i}": ms for i in range(len(names))})  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_is_about_one_layer(tmp_path: Path) -> None:
    """8 layers of 64 MiB FP16 weights (512 MiB) quantized by the stage, each run in a fresh
    process: the peak RSS is the block runner's own (one segment's ORT session, a few copies of
    one layer) plus less than a layer, never the graph. (The eager path this replaced peaked at
    ~4.9 GB on this graph.)"""
    hidden, layers = 4096, 8
    path = decoder_chain(tmp_path / "fuse", layers=layers, hidden=hidden)
    _synthetic_ranges(path, tmp_path / "cal", hidden)
    layer_mb = 2 * hidden * hidden * 2 / 2**20

    def peak(mode: str) -> float:
        r = subprocess.run([sys.executable, "-c", PEAK, str(path.parent), str(tmp_path / "cal"), str(tmp_path / mode),
                            mode, str(hidden)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.splitlines()[-1])
        grew = float(got["peak"] - got["before"])
        print(f"{mode}: peak RSS {got['peak']:.0f} MiB (+{grew:.0f} MiB over imports) in {got['seconds']:.0f} s; "
              f"weights {layers * layer_mb:.0f} MiB, one layer {layer_mb:.0f} MiB")
        assert mode == "runner" or (got["weight_dq"] >= 2 * layers and np.isfinite(got["cosine"]))
        return grew

    floor = peak("runner")
    assert floor < 5 * layer_mb
    for mode in ("int8", "fp8", "int4-weight"):
        assert peak(mode) < floor + layer_mb
