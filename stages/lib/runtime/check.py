"""``vlmforge check PACKAGE``: is this package intact, can this device run it, does it still compute
what the PyTorch model computed?

1. every file against the manifest (sha256 and size; nothing unlisted) -- a miss: exit 1;
2. the package against this device (SM, builder and version, bindings, GPU) -- a refusal: exit 2;
3. the probe set through the chosen backend, compared with the packaged PyTorch reference under
   the packaged gates (``stages.lib.parity.metrics.gate_checks``, as the verify stage) -- a miss: exit 1.

The probe set is the reference stage's held-out samples (``stages.lib.runtime.probes``): the
vision graph, the decoder prefill, and a greedy generation through vision -> embed -> decoder,
each graded under the gate ``probe/probe.json`` records for its graph (generation: the
decoder gate's ``tokens``; a graph without a gate is measured and reported "ungated").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import GateCheck, missed_message
from stages.lib.runtime import probes
from stages.lib.runtime.compat import BACKEND_OF, Compatibility, DeviceInfo, best_backend, check, probe_device
from stages.lib.runtime.errors import PackageError, RuntimeFailure
from stages.lib.runtime.package import FileCheck, Package, opened, verify_files


@dataclass
class GraphResult:
    graph: str
    precision: str
    samples: int
    status: str  # "pass" | "fail" | "ungated" | "error"
    figures: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class CheckResult:
    package: str
    exit_code: int
    message: str
    description: str = ""
    files: FileCheck | None = None
    compat: Compatibility | None = None
    backend: str | None = None
    graphs: list[GraphResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.package, "passed": self.passed, "exit_code": self.exit_code, "message": self.message,
                "description": self.description, "files": self.files.as_dict() if self.files else None,
                "compat": self.compat.as_dict() if self.compat else None, "backend": self.backend,
                "graphs": [g.__dict__ for g in self.graphs]}


def _graded(graph: str, precision: str, n: int, figures: dict[str, Any], gate: dict[str, Any],
            runtime: str) -> GraphResult:
    from stages.lib.parity.metrics import gate_checks, gate_status

    checks = gate_checks(f"{graph}.{precision}.{runtime}", figures, gate)
    return GraphResult(graph, precision, n, gate_status(checks), figures, [c.__dict__ for c in checks])


def check_graph(backend: Any, graph: str, cases: list[probes.Case], precision: str,
                gate: dict[str, Any], noise: float = 0.0) -> GraphResult:
    """Run each probe case; the worst figures over cases and outputs (plus the pooled top-1 of
    logits at the decisive positions, as the verify stage gates it)."""
    from stages.lib.parity.metrics import Agreement, compare, decisive_top1, worst

    sess = backend.session(graph)
    names = [o.name for o in sess.get_outputs()]
    parities, top1 = [], Agreement(0, 0, 0)
    for feeds, refs in cases:
        outs = dict(zip(names, sess.run(None, probes.fit(sess, feeds)), strict=True))
        missing = [n for n in refs if n not in outs]
        if missing:
            raise PackageError(f"probe of {graph}: the graph has no output {missing[0]!r} (it has {names})")
        for n, ref in refs.items():
            out = np.asarray(outs[n], dtype=np.float32)
            parities.append(compare(out.reshape(ref.shape) if out.size == ref.size else out, ref))
            if n == "logits":
                top1 += decisive_top1(out.reshape(ref.shape), ref, noise)
    figures: dict[str, Any] = worst(parities).as_dict()
    if top1.agreement is not None:
        figures["top1"] = top1.agreement
    return _graded(graph, precision, len(cases), figures, gate, backend.name)


def check_generation(pkg: Package, backend: Any, prompts: list[tuple[Any, np.ndarray, np.ndarray | None]],
                     precision: str, gate: dict[str, Any], noise: float = 0.0) -> GraphResult:
    """Greedy generation through the whole chain (no EOS stop) vs the packaged PyTorch tokens:
    ``tokens`` counts the decisive positions up to the first divergence (``free_running_agreement``)."""
    from stages.lib.hostside.generate import token_agreement
    from stages.lib.parity.metrics import Agreement, free_running_agreement
    from stages.lib.runtime.backends import open_pipeline
    from stages.lib.runtime.generate import generate

    pipe = open_pipeline(pkg, backend)
    agreed, per = Agreement(0, 0, 0), []
    for prompt, ref, lead in prompts:
        got = generate(pipe, prompt, max_new_tokens=int(ref.size)).tokens
        margin = np.full(ref.size, np.inf) if lead is None else lead  # an older package: every position
        agreed += free_running_agreement(np.asarray(got).reshape(-1), ref, margin, noise)
        per.append({"tokens": got, "reference": ref.tolist(), "agreement": token_agreement(np.asarray(got), ref)})
    figures: dict[str, Any] = {"tokens_decisive": f"{agreed.decisive}/{agreed.positions}", "per_sample": per}
    if agreed.agreement is not None:
        figures["tokens"] = agreed.agreement
    return _graded("generation", precision, len(prompts), figures, gate, backend.name)


def _error(graph: str, precision: str, n: int, e: Exception) -> GraphResult:
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return GraphResult(graph, precision, n, "error", error=f"{type(e).__name__}: {msg}")


def run_probes(pkg: Package, backend: Any) -> list[GraphResult]:
    meta, samples = probes.load(pkg)
    build = {"vision": probes.vision_case, "decoder": probes.decoder_case}
    out: list[GraphResult] = []
    for graph in (g for g in ("vision", "decoder") if g in pkg.manifest.graphs):
        prec, gate = probes.gate(meta, graph, pkg.manifest.precision.get(graph, "fp16"))
        try:
            sess = backend.session(graph)
            cases = [c for s in samples if (c := build[graph](pkg, sess, s)) is not None]
            if cases:
                out.append(check_graph(backend, graph, cases, prec, gate, probes.noise(meta)))
        except RuntimeFailure:
            raise
        except Exception as e:  # the runtimes' own error types (ORT Fail, TensorRT RuntimeError, ...)
            out.append(_error(graph, prec, len(samples), e))
    prompts = [p for s in samples if (p := probes.generation_prompt(s)) is not None]
    if prompts and "decoder" in pkg.manifest.graphs:
        prec = "+".join(f"{g}:{p}" for g, p in pkg.manifest.precision.items())
        _, gate = probes.gate(meta, "generation", prec)
        try:
            out.append(check_generation(pkg, backend, prompts, prec, gate, probes.noise(meta)))
        except RuntimeFailure:
            raise
        except Exception as e:
            out.append(_error("generation", prec, len(prompts), e))
    if not out:
        raise PackageError(f"{pkg.name}: the probe set holds no case for any packaged graph")
    return out


def choose(pkg: Package, backend: str | None, device: DeviceInfo | None = None) -> Compatibility:
    """The compatibility verdict for ``backend`` (None: the best this device has)."""
    if device is None:
        engine = backend if backend in ("tensorrt_rtx", "tensorrt") else BACKEND_OF.get(pkg.manifest.target.builder)
        device = probe_device((engine,) if engine and backend != "onnxruntime" else ())
    return check(pkg, backend, device) if backend else best_backend(pkg, device)


def check_package(path: str | Path, backend: str | None = None, device: DeviceInfo | None = None) -> CheckResult:
    """Digests, compatibility, probes: a result whose ``exit_code`` is 0, 1 or 2 (see the module doc)."""
    from stages.lib.runtime.backends import open_backend

    res = CheckResult(str(path), 1, "")
    try:
        with opened(path) as pkg:
            res.package, res.description = pkg.name, pkg.describe()
            res.files = verify_files(pkg)
            if not res.files.ok:
                res.message = f"{pkg.name}: {len(res.files.problems)} file(s) differ from the manifest: " \
                              f"{res.files.problems[0]}"
                return res
            res.compat = choose(pkg, backend, device)
            if not res.compat.ok:
                res.exit_code, res.message = 2, str(res.compat.reason)
                return res
            b = open_backend(pkg, res.compat)
            try:
                res.backend = b.describe()
                res.graphs = run_probes(pkg, b)
            finally:
                b.close()
    except RuntimeFailure as e:
        res.exit_code, res.message = e.exit_code, str(e)
        return res
    on = res.compat.backend if res.compat else "?"
    missed = missed_message([GateCheck(**c) for g in res.graphs for c in g.gates], head=f"{res.package}: gate missed on {on}")
    errors = [f"{g.graph}: {g.error}" for g in res.graphs if g.status == "error"]
    if missed:
        res.exit_code, res.message = 1, missed
    elif errors:
        res.exit_code, res.message = 1, f"{res.package}: probe failed to run on {on}: {'; '.join(errors)}"
    else:
        res.exit_code, res.message = 0, f"{res.package}: passed on {on}"
    return res
