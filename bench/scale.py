"""The whole chain at the sizes users ship: per stage seconds, peak RSS and RSS / graph weight bytes.

    .venv/bin/python bench/scale.py --model qwen3-vl-8b [--text-layers N] [--vision-blocks N]
        [--targets rtx4090,rtx3090] [--int4] [--mem-floor-gb 0.5] [--until STAGE] [--accuracy-budget off]
        [--evict-exports]

Writes a random-weight checkpoint with the released configuration (BF16, 2 GB shards;
``stages/lib/checkpoints/released.py``) into ``artifacts/bench/scale/``, a build config beside
it, then runs ``vlmforge build`` on it — through the pipeline's own cache, so an interrupted
run resumes where it stopped and a finished one prints its table again in seconds. ``--int4``
adds an INT4-weight build for the first INT8 target. A watchdog kills the build's process group
when the machine's available memory falls under 0.5 GB (no swap here: the kernel's OOM killer
would otherwise pick any process), or free disk where the cache lives under 1 GB, and the
table says which node it was in.

Per node it prints: seconds, peak RSS of the node's worker process (VmHWM; and its anonymous
part, RssAnon sampled at 5 Hz: VmHWM also counts a mapped or page-cached weight file, which the
kernel can drop under pressure), the FP16 weight
bytes of the largest graph the node reads or writes (ONNX + external data; for the
checkpoint-reading stages, the checkpoint's weights in FP16), the ratio, the goal
(1.25 x graph + 2 GB) and the output bytes. Cached nodes show the figures of the run that
built them.

``--evict-exports``: builds up to ``fuse`` first, then evicts the export entries (``vlmforge
evict``: outputs removed, manifests kept, so fuse and everything after stay cached). At 8 B the
decoder export is 15 GB that the fused graph holds again; a later build that needs the export
(an edited fuse setting) rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = REPO / "artifacts" / "bench" / "scale"
GB = 1024**3
# the stage that runs the whole checkpoint in torch (the export stages are graded on their own graphs)
CHECKPOINT_READERS = ("reference",)
DISK_FLOOR = 1 * GB


def _avail_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _watch(proc: subprocess.Popen[bytes], floor: int, hit: list[str]) -> None:
    """Kill the build's process group under ``floor`` bytes of available memory, or under
    DISK_FLOOR free bytes where the cache lives (a full disk fails a write somewhere deep)."""
    while proc.poll() is None:
        low = "memory" if _avail_bytes() < floor else "disk" if shutil.disk_usage(WORK).free < DISK_FLOOR else ""
        if low:
            hit.append(low)
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def _checkpoint(args: argparse.Namespace) -> Path:
    tag = f"{args.model}-t{args.text_layers or 'full'}-v{args.vision_blocks or 'full'}"
    ckpt = WORK / tag / "checkpoint"
    if not (ckpt / "model.safetensors.index.json").is_file():
        t0 = time.time()
        # in a child process: the generator's peak must not count against the build's parent
        import multiprocessing

        from stages.lib.checkpoints.released import write_random_checkpoint

        child = multiprocessing.get_context("spawn").Process(
            target=write_random_checkpoint, args=(args.model, ckpt, args.text_layers, args.vision_blocks))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"writing the checkpoint failed (exit {child.exitcode})")
        print(f"checkpoint {ckpt}: written in {time.time() - t0:.0f} s", flush=True)
    return ckpt


def _config(args: argparse.Namespace, ckpt: Path) -> Path:
    name = "scale-" + ckpt.parent.name.replace(".", "_")
    path = ckpt.parent / f"{name}.yaml"
    targets = ", ".join(args.targets.split(","))
    text = f"name: {name}\nmodel:\n  checkpoint: {ckpt}\ntargets: [{targets}]\nexport:\n  dtype: fp16\n"
    if args.accuracy_budget is not None:  # else the pipeline's default (gate)
        b = args.accuracy_budget
        text += f"quantize:\n  vision: {{accuracy_budget: {b}}}\n  decoder: {{accuracy_budget: {b}}}\n"
    if args.config_extra:  # top-level YAML the run is measured with (say which in the report)
        text += args.config_extra.rstrip() + "\n"
    path.write_text(text)
    return path


def _build(config: Path, extra: list[str], floor: int) -> tuple[int, Path | None, str | None]:
    cmd = [str(REPO / ".venv" / "bin" / "vlmforge"), "build", str(config), "--json", *extra]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, start_new_session=True)
    hit: list[str] = []
    threading.Thread(target=_watch, args=(proc, floor, hit), daemon=True).start()
    out, _ = proc.communicate()
    run_dir = None
    try:
        run_dir = Path(json.loads(out.decode())["run_dir"])
    except (ValueError, KeyError, TypeError):
        pass
    return proc.returncode, run_dir, hit[0] if hit else None


def _evict_exports(config: Path, floor: int) -> int:
    """Build up to fuse, then evict the export nodes' entries (module docstring)."""
    rc, run_dir, killed = _build(config, ["--until", "fuse"], floor)
    if rc or run_dir is None:
        print(f"build --until fuse exit {rc}" + (f" (killed by the {killed} watchdog)" if killed else ""))
        return rc or 1
    nodes = json.loads((run_dir / "report.json").read_text())["nodes"]
    keys = [n["key"] for n in nodes if n["stage"] in ("export_vision", "export_decoder") and n["status"] in ("ran", "cached")]
    if not keys:
        return 0
    cmd = [str(REPO / ".venv" / "bin" / "vlmforge"), "evict", *keys]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=False)  # refused ones (in use) stay: only disk is at stake
    return 0


def _graph_bytes(files: dict[str, Any]) -> int:
    """ONNX + external data bytes among one node's outputs, by graph: the largest graph."""
    per: dict[str, int] = {}
    for name, meta in files.items():
        base = name.split("/")[-1]
        if ".onnx" in base:
            stem = base.split(".onnx")[0]
            per[stem] = per.get(stem, 0) + int(meta["bytes"])
    return max(per.values(), default=0)


def _manifest_timing(key: str | None, name: str) -> Any:
    """A figure from a node's cache manifest (a report written before the figure existed)."""
    try:
        return json.loads((REPO / "artifacts" / "cache" / str(key) / "manifest.json").read_text())["timings"].get(name)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _table(report: dict[str, Any], ckpt_fp16: int) -> list[dict[str, Any]]:
    from pipeline.graph import load_stages  # the registry knows each stage's deps

    stages = {name: st for name, (_, st) in load_stages().items()}
    nodes = {n["id"]: n for n in report["nodes"]}
    rows = []
    for n in report["nodes"]:
        own = _graph_bytes(n.get("outputs") or {})
        dep_ids = [d if d in nodes else f"{d}@{n['target']}" for d in stages[n["stage"]].deps]
        deps = max((_graph_bytes(nodes[d].get("outputs") or {}) for d in dep_ids if d in nodes), default=0)
        graph = max(own, deps, ckpt_fp16 if n["stage"] in CHECKPOINT_READERS else 0)
        rss = n.get("peak_rss_mb") or n.get("built_peak_rss_mb")
        anon = n.get("peak_anon_mb") or _manifest_timing(n.get("key"), "peak_anon_mb")
        secs = n.get("seconds") if n["status"] not in ("cached", "evicted") else n.get("built_seconds")
        rows.append({"node": n["id"], "status": n["status"], "seconds": secs, "peak_rss_gb": rss and rss / 1024,
                     "anon_gb": anon and anon / 1024,
                     "graph_gb": graph / GB, "ratio": (rss * 2**20 / graph) if rss and graph else None,
                     "goal_gb": (1.25 * graph + 2 * GB) / GB,
                     "out_gb": sum(int(m["bytes"]) for m in (n.get("outputs") or {}).values()) / GB,
                     "error": (n.get("error") or "").splitlines()[0][:90] if n.get("error") else ""})
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    print(f"{'node':22} {'status':8} {'s':>7} {'peak GB':>8} {'anon GB':>8} {'graph GB':>9} {'ratio':>6} "
          f"{'goal GB':>8} {'meets':>5} {'out GB':>7}")
    for r in rows:
        meets = "-" if r["peak_rss_gb"] is None else ("yes" if r["peak_rss_gb"] <= r["goal_gb"] else "NO")
        print(f"{r['node']:22} {r['status']:8} {f(r['seconds'], '7.1f')} {f(r['peak_rss_gb'], '8.2f')} "
              f"{f(r['anon_gb'], '8.2f')} {f(r['graph_gb'], '9.2f')} {f(r['ratio'], '6.2f')} {f(r['goal_gb'], '8.2f')} {meets:>5} "
              f"{f(r['out_gb'], '7.2f')}  {r['error']}")


def _builder_share(report: dict[str, Any]) -> list[str]:
    """Per engine node and graph: the TensorRT builder's own anonymous memory (RssAnon from the
    parse to the plan written, ``trt_builder.BuildResult``) against the graph it built."""
    nodes = {n["id"]: n for n in report["nodes"]}
    lines = []
    for n in report["nodes"]:
        if n["stage"] != "engine" or not isinstance(n.get("metrics"), dict):
            continue
        src = nodes.get(f"quantize@{n['target']}", {}).get("outputs") or {}
        for g, m in n["metrics"].items():
            if not isinstance(m, dict) or "builder_anon_mb" not in m:
                continue
            graph = sum(int(f["bytes"]) for name, f in src.items() if name.split("/")[-1].startswith(f"{g}.onnx"))
            ratio = f" = {m['builder_anon_mb'] * 2**20 / graph:.2f}x its graph ({graph / GB:.2f} GB)" if graph else ""
            lines.append(f"{n['id']} {g}: builder's own share {m['builder_anon_mb'] / 1024:.2f} GB anonymous{ratio}; "
                         f"held before the build {m.get('anon_before_build_mb', 0) / 1024:.2f} GB; "
                         f"engine {int(m['bytes']) / GB:.2f} GB")
    return lines


def _disk_needed(weights: int, targets: int, until: str | None) -> int:
    """Bytes a whole build writes, from the checkpoint's FP16 weight bytes: export (1x), fuse (1x:
    a rewritten copy; hard links are refused by onnx's loaders), and per target a quantized graph
    and its engine (~0.55x each at 8 bits, lm_head and embeddings kept FP16), plus the package
    tar (~1.1x: graphs and engines) unless the build stops before it."""
    per_target = 1.1 + (0.0 if until in ("quantize", "engine", "verify") else 1.1)
    return int(weights * (2.0 + targets * per_target))


def main() -> int:
    from stages.lib.checkpoints.released import RELEASED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(RELEASED), default="qwen3-vl-8b")
    ap.add_argument("--text-layers", type=int)
    ap.add_argument("--vision-blocks", type=int)
    ap.add_argument("--targets", default="rtx4090,rtx3090")
    ap.add_argument("--int4", action="store_true", help="also an INT4-weight build of the first INT8 target")
    ap.add_argument("--until", help="stop after this stage")
    ap.add_argument("--mem-floor-gb", type=float, default=0.5, help="kill the build below this MemAvailable")
    ap.add_argument("--accuracy-budget", help="quantize.<graph>.accuracy_budget for both graphs (gate, off or a "
                    "cosine; default: the pipeline's): off measures the plain quantized chain without the fallback search")
    ap.add_argument("--config-extra", help="top-level YAML appended to the build config, e.g. "
                    "'gates: {int8: {cosine: 0.98}}' to measure engines and verify past a gate the model misses")
    ap.add_argument("--evict-exports", action="store_true", help="once fuse is built, evict the export entries "
                    "(their outputs; manifests stay, so nothing after them reruns): ~1x the weights of disk back")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt = _checkpoint(args)
    config = _config(args, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    ckpt_fp16 = int(index["metadata"]["total_size"])  # BF16 bytes == FP16 bytes
    need = _disk_needed(ckpt_fp16, len(args.targets.split(",")), args.until) - (ckpt_fp16 if args.evict_exports else 0)
    free = shutil.disk_usage(WORK).free
    if free < need:  # cached nodes need nothing: a warning, not a refusal (a resumed run may fit)
        print(f"warning: a whole build writes ~{need / GB:.0f} GB and {WORK} has {free / GB:.0f} GB free; "
              "cached nodes need none of it (fewer --targets, or --until verify, need less)", flush=True)
    extra = ["--until", args.until] if args.until else []
    runs = [extra]
    if args.int4:
        runs.append([*extra, "--precision", "int4-weight", "--target", "rtx3090"])
    rc_all = 0
    if args.evict_exports and args.until not in ("checkpoint", "export_vision", "export_decoder"):
        rc_all = _evict_exports(config, int(args.mem_floor_gb * GB))
        if rc_all:
            return rc_all
    for run in runs:
        t0 = time.time()
        rc, run_dir, killed = _build(config, run, int(args.mem_floor_gb * GB))
        rc_all = rc_all or rc
        print(f"build exit {rc} in {time.time() - t0:.0f} s" + (f" (killed by the {killed} watchdog)" if killed else ""))
        if run_dir is None or not (run_dir / "report.json").is_file():
            print("no report (the build was killed before writing it); cached nodes survive: rerun to resume")
            continue
        rows = _table(json.loads((run_dir / "report.json").read_text()), ckpt_fp16)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"model {args.model} ({ckpt_fp16 / GB:.2f} GB BF16 weights); report {run_dir / 'report.md'}"
                  + (f"; config extra: {args.config_extra}" if args.config_extra else ""))
            _print(rows)
            for line in _builder_share(json.loads((run_dir / "report.json").read_text())):
                print(line)
    return rc_all


if __name__ == "__main__":
    raise SystemExit(main())
