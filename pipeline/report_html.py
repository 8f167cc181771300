"""A self-contained ``report.html`` per run, from ``report.json`` (and the cache for details).

Self-contained: inline CSS, figures as base64 PNG data URIs, no scripts, no external resources:
it opens from a mail attachment or an air-gapped share. Sections: result, stage timings and
cache hits, the parity table (every graph x precision x target: pass / fail / not-run, a
comparison that did not run is never shown as passed), per-block error plots (drill-down), the
engine precision summary and the layers kept in high precision.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1d2330;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:30px;border-bottom:1px solid #dde;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #d5d9e2;padding:3px 8px;text-align:left}
th{background:#f1f3f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass,.ran,.ok{background:#d9f2dc}.fail,.failed{background:#f9d6d5;font-weight:600}
.not-run,.skipped{background:#fff1c9}.ungated{background:#f4f4f6;color:#445}.cached{background:#e8eaf0}.muted{color:#667}
figure{display:inline-block;margin:8px 16px 8px 0}figcaption{font-size:12px;color:#445}img{max-width:100%}
code{background:#f3f4f7;padding:0 3px}.scroll{overflow-x:auto}
"""
FIGS = ("cosine", "rel_l2", "max_abs", "norm_ratio", "top1", "top5", "tokens", "tokens_prefix")


def _num(v: Any, key: str = "") -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float) and key == "cosine" and 0.999 < v < 1.0:
        return f"{v:.9f}"  # gates sit at 0.9999: 6 significant digits would print 1
    if isinstance(v, float):
        return f"{v:.6g}"
    return escape(str(v))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{escape(classes[i])}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _cached_file(cache: Path | None, node: dict[str, Any], name: str, problems: list[str] | None = None) -> Any:
    """A JSON output of a node from the cache (None when absent: the report still renders).

    The entry may have vanished (gc, fsck quarantine) or been damaged since the build: what
    could not be read is added to ``problems`` (one line each) instead of raising. A file
    missing from a node that never committed one (failed, or not among its outputs) is not news.
    """
    if cache is None or not node.get("key"):
        return None
    entry = cache / str(node["key"])
    f = entry / "out" / name
    expected = node.get("status") in ("ran", "cached") and name in _dict(node.get("outputs"))
    where = f"{node.get('id')}: {name}"
    try:
        doc = json.loads(f.read_text())
    except (FileNotFoundError, NotADirectoryError):
        if expected and problems is not None:
            gone = "cache entry is gone" if not entry.is_dir() else "missing from its cache entry"
            problems.append(f"{where}: {gone} ({entry}); removed or quarantined since the build?")
        return None
    except OSError as e:
        if problems is not None:
            problems.append(f"{where}: cannot read {f} ({e.strerror or e})")
        return None
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        if problems is not None:
            problems.append(f"{where}: damaged, not valid JSON ({str(e).splitlines()[0][:160]}): {f}")
        return None
    if not isinstance(doc, dict):
        if problems is not None:
            problems.append(f"{where}: damaged, a JSON {type(doc).__name__} where an object was expected: {f}")
        return None
    return doc


def parity_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verify row of the run; a verify node that produced none becomes one not-run row."""
    out = []
    for n in doc.get("nodes", []):
        if n.get("stage") != "verify":
            continue
        rows = (n.get("metrics") or {}).get("rows") or {}
        for key, r in rows.items():
            graph, runtime = key.rsplit(".", 1)
            out.append({"target": n.get("target"), "graph": graph, "runtime": runtime, **r})
        if not rows:
            why = n.get("error") or n.get("reason") or n.get("status")
            out.append({"target": n.get("target"), "graph": "(all)", "runtime": "-", "precision": "-",
                        "status": "not-run", "reason": f"verify node {n.get('status')}: {why}"})
    return out


def _timings(doc: dict[str, Any]) -> str:
    from pipeline.plots import timings_png

    nodes = doc.get("nodes", [])
    rows, cls = [], []
    for n in nodes:
        built = n.get("built_seconds")
        rows.append([escape(str(n["id"])), escape(str(n["status"])), _num(n.get("seconds")),
                     _num(built) if n.get("status") == "cached" else "", _num(n.get("peak_rss_mb")),
                     f"<code>{escape(str(n.get('key') or '-')[:12])}</code>",
                     escape(str(n.get("error") or n.get("reason") or ""))[:300]])
        cls.append(str(n["status"]))
    hits = sum(n["status"] == "cached" for n in nodes)
    head = f"<p>{len(nodes)} nodes: {hits} cache hits, {sum(n['status'] == 'ran' for n in nodes)} ran, " \
           f"{sum(n['status'] in ('failed', 'skipped') for n in nodes)} failed/skipped.</p>"
    fig = _img(timings_png(nodes), "seconds per node") if nodes else ""
    return head + _table(["node", "status", "seconds", "built (cached)", "peak RSS MB", "key", "note"], rows, cls) + fig


def _parity(doc: dict[str, Any]) -> str:
    rows = parity_rows(doc)
    if not rows:
        return "<p class='muted'>No verify node in this run: parity was not checked.</p>"
    head = "".join(f"<th>{escape(c)}</th>" for c in ["target", "graph", "runtime", "precision", "status", *FIGS])
    body = []
    for r in rows:
        ids = "".join(f"<td>{escape(str(r.get(k)))}</td>" for k in ("target", "graph", "runtime", "precision", "status"))
        if r["status"] == "not-run":  # no figures: the reason spans their columns
            figs = f"<td colspan='{len(FIGS)}'>{escape(str(r.get('reason') or 'not run'))}</td>"
        else:
            figs = "".join(f"<td class='n'>{_num(r.get(f), f)}</td>" for f in FIGS)
        body.append(f"<tr class='{escape(str(r['status']))}'>{ids}{figs}</tr>")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "not-run", "ungated")}
    note = f"<p>{counts['pass']} passed, {counts['fail']} failed, {counts['not-run']} not run " \
           f"(a comparison that did not run is not a pass), {counts['ungated']} measured with no gate set " \
           "(add one under <code>gates:</code> to enforce it).</p>"
    return note + f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _drilldowns(doc: dict[str, Any]) -> str:
    from pipeline.plots import block_errors_png

    parts = []
    for n in (x for x in doc.get("nodes", []) if x.get("stage") == "verify"):
        for graph, d in ((n.get("metrics") or {}).get("drilldown") or {}).items():
            title = f"{graph} on {n.get('target')}: error per block vs PyTorch"
            png = block_errors_png(d.get("blocks") or [], title, d.get("jump_block"))
            cap = escape(f"{n['id']} / {graph}: {d.get('why')}")
            parts.append(f"<figure>{_img(png, title)}<figcaption>{cap}</figcaption></figure>")
    return "".join(parts) or "<p class='muted'>No drill-down ran (all gates met and verify.drilldown is not 'always').</p>"


def _engines(doc: dict[str, Any], cache: Path | None, problems: list[str] | None = None) -> str:
    rows = []
    for n in doc.get("nodes", []):
        if n.get("stage") != "engine":
            continue
        for graph, m in (n.get("metrics") or {}).items():
            if not isinstance(m, dict):
                continue
            layers = _cached_file(cache, n, f"{graph}.layers.json", problems) or {}
            prec = ", ".join(f"{k}: {v}" for k, v in sorted(_dict(layers.get("gemm_conv_precisions")).items()))
            mha = ", ".join(f"{k}: {v}" for k, v in sorted(_dict(layers.get("mha_precisions")).items()))
            rows.append([escape(str(n.get("target"))), escape(graph), escape(str(m.get("precision"))),
                         _num(m.get("layers")), _num(m.get("fused_mha")), _num(m.get("low_precision_gemm_share")),
                         escape(prec), escape(mha), _num(m.get("bytes")), _num(m.get("build_seconds")), escape(str(m.get("parity")))])
        if not (n.get("metrics") or {}):
            rows.append([escape(str(n.get("target"))), "-", "-", "", "", "", "", "", "", "",
                         escape(f"engine node {n.get('status')}: {n.get('error') or n.get('reason') or ''}")])
    if not rows:
        return "<p class='muted'>No engine node in this run.</p>"
    head = ["target", "graph", "precision", "layers", "fused MHA", "low-precision GEMM share",
            "GEMM/conv layer precisions", "fused MHA precisions", "bytes", "build s", "engine parity"]
    return _table(head, rows)


def _kept(doc: dict[str, Any], cache: Path | None, problems: list[str] | None = None) -> str:
    rows = []
    for n in doc.get("nodes", []):
        if n.get("stage") != "quantize":
            continue
        seen = len(problems) if problems is not None else 0
        q = _cached_file(cache, n, "quantize.json", problems) or {}
        unread = problems is not None and len(problems) > seen
        for graph, m in (n.get("metrics") or {}).items():
            if not isinstance(m, dict):
                continue
            kept = _dict(q.get(graph)).get("kept_high_precision")
            kept = [k for k in kept if isinstance(k, dict)] if isinstance(kept, list) else None
            if kept:
                for k in kept:
                    what = k.get("node") or k.get("group") or "?"
                    rows.append([escape(str(n["id"])), escape(graph), escape(str(m.get("precision"))),
                                 f"<code>{escape(str(what))}</code>", escape(str(k.get("why", "")))])
            else:
                count = m.get("kept")
                why = "could not be read, see below" if unread else "not in the cache"
                detail = "none" if count == 0 else f"{count} (details: quantize.json {why})"
                rows.append([escape(str(n["id"])), escape(graph), escape(str(m.get("precision"))), escape(detail), ""])
    if not rows:
        return "<p class='muted'>No quantize node in this run.</p>"
    return _table(["node", "graph", "precision", "kept high-precision", "why"], rows)


def _section(fn: Any, *args: Any) -> str:
    """One section; input it cannot make sense of costs that section only, not the report."""
    try:
        return str(fn(*args))
    except Exception as e:  # a damaged detail costs its section, not the whole report
        return f"<p class='fail'>This section could not be rendered ({escape(type(e).__name__)}: {escape(str(e)[:300])}).</p>"


def render_html(doc: dict[str, Any], cache: Path | None = None) -> str:
    tool = ", ".join(f"{k} {v}" for k, v in (doc.get("toolchain") or {}).items())
    result = str(doc.get("result", ""))
    problems: list[str] = []  # what could not be read from the cache: listed, never a traceback
    sections = [
        ("Stage timings and cache hits", _section(_timings, doc)),
        ("Parity against PyTorch", _section(_parity, doc)),
        ("Per-block error (drill-down)", _section(_drilldowns, doc)),
        ("Engine precision summary", _section(_engines, doc, cache, problems)),
        ("Layers kept in high precision", _section(_kept, doc, cache, problems)),
    ]
    if problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in problems)
        sections.append(("Not read from the cache", "<p class='fail'>These details were missing or damaged when "
                         "the report was written; the tables above omit them.</p>" f"<ul>{items}</ul>"))
    body = "".join(f"<h2>{escape(t)}</h2>{html}" for t, html in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>vlmforge report: {escape(str(doc.get('config_name', '')))}</title><style>{CSS}</style></head><body>"
        f"<h1>vlmforge build report: {escape(str(doc.get('config_name', '')))}</h1>"
        f"<p>result: <span class='{'pass' if result == 'ok' else 'fail'}'>{escape(result)}</span> · "
        f"config <code>{escape(str(doc.get('config', '')))}</code> · started {escape(str(doc.get('started', '')))} · "
        f"{_num(doc.get('wall_seconds'))} s wall</p><p class='muted'>toolchain: {escape(tool)}</p>"
        f"{body}</body></html>\n"
    )


def write_html_report(run_dir: Path, doc: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """Write ``run_dir/report.html``. ``cache`` defaults to ``<artifacts>/cache`` (run_dir is
    ``<artifacts>/runs/<config>/<stamp>``); missing cache entries only shorten the details."""
    from pipeline.errors import OutputError
    from pipeline.fsutil import atomic_write_text

    run_dir = Path(run_dir)
    if doc is None:
        src = run_dir / "report.json"
        try:
            doc = json.loads(src.read_text())
        except OSError as e:
            raise OutputError(f"{src}: cannot read ({e.strerror or e})") from None
        except ValueError as e:
            raise OutputError(f"{src}: not valid JSON ({str(e).splitlines()[0][:160]})") from None
    if cache is None and len(run_dir.resolve().parents) >= 3:
        cache = run_dir.resolve().parents[2] / "cache"
    out = run_dir / "report.html"
    # atomic (pipeline.fsutil): a full disk is one line and exit 1, the previous report.html
    # stays; mode 0644, a report is for sharing
    atomic_write_text(out, render_html(doc, cache if cache is not None and cache.is_dir() else None))
    return out
