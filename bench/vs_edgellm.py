"""vlmforge's export stages against TensorRT Edge-LLM's export, side by side on one deep checkpoint.

    .venv/bin/python bench/vs_edgellm.py [--edgellm /work/edgellm-venv/bin/tensorrt-edgellm-export]
        [--repeats 3] [--work artifacts/bench/vs_edgellm]

The checkpoint is the released Qwen2.5-VL-3B layout at small widths (36 text layers, 32 vision
blocks with the released window / full-attention pattern, hidden 256, the real 151936-token
vocabulary, random BF16 weights; ``stages/lib/released_checkpoints``), written once. Each repeat
runs both commands, alternating which goes first so a noisy neighbour slows both alike:

- vlmforge: ``vlmforge build --until export_decoder --force export_vision --force export_decoder``
  (the checkpoint node is cached): both exports *with their parity checks* — what a user waits for;
- Edge-LLM: ``tensorrt-edgellm-export CKPT OUT`` (vision + LLM ONNX, no parity).

Per command it prints the median wall seconds and max RSS (the child's ``ru_maxrss`` from
``wait4``), and vlmforge's per-stage seconds (graph export alone and the whole stage). Edge-LLM is
installed in its own venv (docs/FIELD_NOTES.md §4: torch==2.13.0, then tensorrt-edgellm[export]==0.11.0,
nvidia-modelopt==0.45.0 requests datasets (its quantization module imports datasets, undeclared);
torchvision removed); without it the bench says so and stops. The checkpoint carries the ChatML
chat_template.jinja released Qwen-VL checkpoints ship (Edge-LLM refuses a checkpoint without one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The deep narrow model of the issue: the released 3B layout (36 layers / 32 blocks), small widths.
WIDTHS: dict[str, dict[str, Any]] = {"text": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "mrope_section": [8, 12, 12]},
          "vision": {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4}}


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, max RSS GB, exit code) of one command: stdout into ``log``, stderr beside it."""
    t0 = time.perf_counter()
    with log.open("wb") as out, log.with_suffix(".err").open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024**2, proc.returncode


def _vlmforge_stages(stdout_log: Path) -> dict[str, dict[str, float]]:
    """Per export node: whole-stage seconds and the graph export's own seconds (its metric)."""
    report = json.loads(stdout_log.read_text())
    run = json.loads((Path(report["run_dir"]) / "report.json").read_text())
    out = {}
    for n in run["nodes"]:
        if n["id"] in ("export_vision", "export_decoder"):
            out[n["id"]] = {"stage": float(n["seconds"] or 0), "export": float((n.get("metrics") or {}).get("export_seconds") or 0)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edgellm", default="/work/edgellm-venv/bin/tensorrt-edgellm-export")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench" / "vs_edgellm")
    args = ap.parse_args()
    if not Path(args.edgellm).is_file():
        raise SystemExit(f"{args.edgellm}: not found; install Edge-LLM in its own venv (this file's docstring)")
    from stages.lib.checkpoints.released import write_random_checkpoint

    work = args.work.resolve()
    ckpt = write_random_checkpoint("qwen2.5-vl-3b", work / "checkpoint", widths=WIDTHS)
    cfg = work / "vs-edgellm.yaml"
    cfg.write_text(f"name: vs-edgellm\nmodel:\n  checkpoint: {ckpt}\ntargets: [rtx4090]\nexport:\n  dtype: fp16\n")
    env = {**os.environ, "VLMFORGE_ARTIFACTS": str(work / "artifacts")}
    ours = [str(REPO / ".venv" / "bin" / "vlmforge"), "build", str(cfg), "--json", "--until", "export_decoder",
            "--force", "export_vision", "--force", "export_decoder"]
    subprocess.run([*ours[:4], "--until", "checkpoint"], cwd=REPO, env=env, check=True, capture_output=True)
    runs: dict[str, list[tuple[float, float]]] = {"vlmforge": [], "edgellm": []}
    stages: list[dict[str, dict[str, float]]] = []
    for i in range(args.repeats):
        order = ["vlmforge", "edgellm"] if i % 2 == 0 else ["edgellm", "vlmforge"]
        for who in order:
            log = work / f"{who}-{i}.log"
            if who == "vlmforge":
                wall, rss, rc = _timed(ours, env, log)
            else:
                out = work / f"edgellm-out-{i}"
                subprocess.run(["rm", "-rf", str(out)], check=True)  # our own output folder of a previous run
                wall, rss, rc = _timed([args.edgellm, str(ckpt), str(out)], dict(os.environ), log)
            if rc != 0:
                raise SystemExit(f"{who} run {i} failed (exit {rc}); its output: {log}")
            runs[who].append((wall, rss))
            if who == "vlmforge":
                stages.append(_vlmforge_stages(log))
            print(f"run {i} {who:9} {wall:7.1f} s  max RSS {rss:5.2f} GB", flush=True)
    med = {w: statistics.median(t for t, _ in r) for w, r in runs.items()}
    print("\n| | vlmforge (export stages, parity included) | Edge-LLM 0.11 export |\n|---|---|---|")
    print(f"| whole command wall, median of {args.repeats} | {med['vlmforge']:.1f} s | {med['edgellm']:.1f} s |")
    print(f"| max RSS, largest | {max(r for _, r in runs['vlmforge']):.2f} GB | {max(r for _, r in runs['edgellm']):.2f} GB |")
    for node in ("export_decoder", "export_vision"):
        ex = [s[node]["export"] for s in stages if node in s]
        st = [s[node]["stage"] for s in stages if node in s]
        print(f"| {node}: graph export / whole stage, median | {statistics.median(ex):.1f} s / {statistics.median(st):.1f} s | — |")
    print(f"\nratio vlmforge / Edge-LLM (whole command): {med['vlmforge'] / med['edgellm']:.2f}")


if __name__ == "__main__":
    main()
