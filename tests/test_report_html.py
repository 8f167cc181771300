"""report.html: self-contained, every parity row with its status, opens in headless Chromium
with no script or console errors, and a screenshot is taken.

The browser test needs a chromium / chromium-browser / google-chrome on PATH. Without one it is
skipped with a reason (``make test`` on a fresh machine passes, and says what did not run),
unless ``VLMFORGE_REQUIRE_BROWSER=1`` (set by ``.ci/run``): then a missing browser fails, so CI
never skips the only browser test silently."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pipeline.report_html import render_html, section_titles, write_html_report
from pipeline.stage import ReportTable, report_dicts

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Records script errors, failed resource loads, console.error calls and undecodable images on
# the <body> so that --dump-dom shows them (headless Chromium has no other channel for them).
PROBE = """<script>(function(){var errs=[];
addEventListener('error',function(e){errs.push('error:'+(e.message||(e.target&&(e.target.src||e.target.href))||'?'))},true);
var ce=console.error;console.error=function(){errs.push('console:'+[].join.call(arguments,' '));ce.apply(console,arguments)};
addEventListener('load',function(){[].forEach.call(document.images,function(i){if(!(i.complete&&i.naturalWidth>0))errs.push('image:'+i.alt)});
document.body.setAttribute('data-probe',errs.length?errs.join('|'):'clean')});})();</script>"""


def _node(id_: str, stage: str, target: str | None, status: str, report: list[Any], **kw: Any) -> dict[str, Any]:
    return {"id": id_, "stage": stage, "target": target, "key": kw.get("key", id_ + "-key"), "cached": status == "cached",
            "status": status, "reason": "", "seconds": kw.get("seconds", 1.0), "peak_rss_mb": 100.0, "outputs": {},
            "metrics": kw.get("metrics", {}), "gates": kw.get("gates", []), "notes": [], "error": kw.get("error"),
            "built_seconds": kw.get("built"), "report": report_dicts(report), "sections": [list(x) for x in kw.get("sections", ())]}


def _verify_parts(target: str) -> list[Any]:
    """What the verify stage reports: its own table builder over a row of each status."""
    from stages.lib.parity.report import report_parts

    rows = [
        {"graph": "vision", "runtime": "onnxruntime", "precision": "fp8", "status": "pass", "reason": "",
         "figures": {"cosine": 0.9991, "rel_l2": 0.04, "max_abs": 0.2, "norm_ratio": 0.01}},
        {"graph": "decoder", "runtime": "onnxruntime", "precision": "fp8", "status": "fail", "reason": "",
         "figures": {"cosine": 0.95, "rel_l2": 0.3, "max_abs": 2.0, "top1": 0.7, "top5": 0.9}},
        {"graph": "generation", "runtime": "onnxruntime", "precision": "vision:fp8+decoder:fp8", "status": "fail",
         "reason": "", "figures": {"tokens": 0.5}},
        {"graph": "vision", "runtime": "tensorrt", "precision": "fp8", "status": "not-run",
         "reason": "engine comparison not run: no CUDA GPU on this host"},
    ]
    blocks = [{"block": i, "cosine": 1 - 10.0 ** (-6 + 3 * (i >= 2)), "rel_l2": 1e-3 * (1 + 40 * (i >= 2)),
               "max_abs": 0.01 * (i + 1)} for i in range(4)]
    return report_parts(target, rows, {"decoder": {"jump": {"block": 2, "why": "rel-L2 rises at block 2"}, "blocks": blocks}})


def sample_doc() -> dict[str, Any]:
    from stages import engine, quantize, verify

    kept = ReportTable(quantize.KEPT, ("graph", "precision", "kept high-precision", "why"),
                       (("vision", "fp8", "none", ""), ("decoder", "fp8", "lm_head_MatMul", "pattern *lm_head*")))
    eng = ReportTable(engine.SECTION, engine.COLUMNS, (("rtx4090", "vision", "fp8", 12, 2, 1.0, "fp8: 10", "", 1000, 2.0,
                                                         "not run: no CUDA GPU"),))
    gates = [{"name": "decoder.fp8.cosine", "value": 0.95, "threshold": 0.99, "op": ">=", "passed": False}]
    return {
        "config": "/x/default.yaml", "config_name": "default <b>&", "started": "2026-11-21T09:00:00",
        "wall_seconds": 3.5, "result": "failed", "toolchain": {"torch": "2.13.0"}, "summary": {},
        "nodes": [
            _node("checkpoint", "checkpoint", None, "cached", [], built=4.0),
            _node("quantize@rtx4090", "quantize", "rtx4090", "ran", [kept], sections=quantize.STAGE.report_sections),
            _node("engine@rtx4090", "engine", "rtx4090", "ran", [eng], sections=engine.STAGE.report_sections),
            _node("verify@rtx4090", "verify", "rtx4090", "failed", _verify_parts("rtx4090"), error="parity gate missed",
                  sections=verify.STAGE.report_sections, gates=gates),
            _node("verify@rtx3090", "verify", "rtx3090", "skipped", [], key=None, error="engine@rtx3090 failed",
                  sections=verify.STAGE.report_sections),
        ],
    }


def test_sections_come_from_the_stages_and_a_check_that_did_not_run_is_not_a_pass() -> None:
    doc = sample_doc()
    assert list(section_titles(doc)) == ["Layers kept in high precision", "Engine precision summary",
                                         "Parity against PyTorch", "Per-block error (drill-down)"]
    html = render_html(doc)
    parity = html.split("<h2>Parity against PyTorch</h2>")[1].split("<h2>")[0]
    # the four rows of verify@rtx4090, and one not-run row for the verify node that never ran
    assert len(re.findall(r"<tr class='pass'>", parity)) == 1 and len(re.findall(r"<tr class='fail'>", parity)) == 2
    assert len(re.findall(r"<tr class='not-run'>", parity)) == 2 and "verify node skipped: engine@rtx3090 failed" in parity
    assert "1 passed, 2 failed, 2 not run" in parity
    assert "1 parity gates checked, 1 missed" in html


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    html = render_html(sample_doc())
    assert "default &lt;b&gt;&amp;" in html and "<b>&" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "external resource in report.html"
    assert "<script" not in html
    assert html.count("data:image/png;base64,") == 1 and html.count("<svg") == 1  # drill-down; timings (SVG)
    assert "lm_head_MatMul" in html and "engine comparison not run: no CUDA GPU" in html and "fp8: 10" in html


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = "no Chromium: install it (apt-get install chromium) or set VLMFORGE_REQUIRE_BROWSER=1 in CI"


def _chromium() -> str:
    """The headless browser; skipped without one, failed without one under VLMFORGE_REQUIRE_BROWSER=1."""
    exe = next((e for e in map(shutil.which, BROWSERS) if e), None)
    if exe is not None:
        return exe
    if os.environ.get("VLMFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"VLMFORGE_REQUIRE_BROWSER=1 but none of {', '.join(BROWSERS)} is on PATH: the browser test "
                    "must run here (apt-get update && apt-get install -y chromium)", pytrace=False)
    pytest.skip(f"browser test did not run: {NO_BROWSER}")


def _browse(exe: str, args: list[str], page: Path) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=120)


def test_html_opens_in_headless_chromium_without_errors(tmp_path: Path) -> None:
    exe = _chromium()
    run = tmp_path / "runs" / "default" / "20260101-000000-1"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(sample_doc()))
    page = write_html_report(run)
    assert page == run / "report.html"
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    r = _browse(exe, ["--virtual-time-budget=5000", "--dump-dom"], probed)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert m is not None, f"page did not finish loading in Chromium:\n{r.stdout[:500]}\n{r.stderr[-1500:]}"
    assert m.group(1) == "clean", f"errors in report.html: {m.group(1)}"
    shot = tmp_path / "report.png"
    r = _browse(exe, ["--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,2400",
                      "--hide-scrollbars"], page)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or ":ERROR:" in ln)]
    assert not console, console
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_html_from_a_real_build_report(cli: Any) -> None:
    """The runner's own report.json (fake stages, a cached second build) renders: what a
    build writes and what report_html reads must not drift apart."""
    cfg = cli.config()
    cli("build", str(cfg))
    cli("build", str(cfg))  # all cached: the timings table shows cache hits
    run = cli.tmp / "artifacts" / "runs" / "fake" / "latest"
    page = write_html_report(run)
    html = page.read_text()
    doc = json.loads((run / "report.json").read_text())
    assert all(escape_id in html for escape_id in (n["id"] for n in doc["nodes"]))
    assert f"{len(doc['nodes'])} cache hits" in html
    # the fake final stage's table went worker -> manifest -> report.json -> html, cached too
    fake = html.split("<h2>Fake figures</h2>")[1].split("<h2>")[0]
    finals = [n for n in doc["nodes"] if n["stage"] == "final"]
    assert finals and all(n["report"] for n in finals if n["status"] in ("ran", "cached"))
    assert len(re.findall(r"<tr class='(?:pass|fail)'>", fake)) == sum(n["status"] in ("ran", "cached") for n in finals)
