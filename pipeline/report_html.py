"""A self-contained ``report.html`` per run, from ``report.json`` alone.

Self-contained: inline CSS, figures as base64 PNG data URIs, no scripts, no external resources:
it opens from a mail attachment or an air-gapped share. Generic: the result, the stage timings
and cache hits, then the sections the stages declare (``Stage.report_sections``) filled with the
tables and figures their results carry (``StageResult.report``); this module knows no stage and
reads no stage's files. A node that declared a section and ended without filling it gets a
not-run row there, so a check that did not run is never shown as passed.
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


def _timings(doc: dict[str, Any]) -> str:
    from pipeline.plots import timings_svg

    nodes = doc.get("nodes", [])
    rows, cls = [], []
    for n in nodes:
        built = n.get("built_seconds")
        rows.append([escape(str(n["id"])), escape(str(n["status"])), _num(n.get("seconds")),
                     _num(built) if n.get("status") == "cached" else "", _num(n.get("peak_rss_mb")),
                     escape(str(n.get("worker") or "")), f"<code>{escape(str(n.get('key') or '-')[:12])}</code>",
                     escape(str(n.get("error") or n.get("reason") or ""))[:300]])
        cls.append(str(n["status"]))
    hits = sum(n["status"] == "cached" for n in nodes)
    head = f"<p>{len(nodes)} nodes: {hits} cache hits, {sum(n['status'] == 'ran' for n in nodes)} ran, " \
           f"{sum(n['status'] in ('failed', 'skipped') for n in nodes)} failed/skipped.</p>"
    fig = f"<figure>{timings_svg(nodes)}</figure>" if nodes else ""
    return head + _table(["node", "status", "seconds", "built (cached)", "peak RSS MB", "worker", "key", "note"], rows, cls) + fig


def _parts(doc: dict[str, Any]) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """{section title: [(node, part)]} in node order: what the stages put in their results."""
    out: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for n in doc.get("nodes", []):
        for part in n.get("report") or []:
            if isinstance(part, dict) and part.get("section"):
                out.setdefault(str(part["section"]), []).append((n, part))
    return out


def section_titles(doc: dict[str, Any]) -> dict[str, str]:
    """{title: text when empty}: every section a node of the run declares or fills, in order."""
    titles: dict[str, str] = {}
    for n in doc.get("nodes", []):
        for title, empty in (tuple(x) for x in n.get("sections") or []):
            titles.setdefault(str(title), str(empty))
        for part in n.get("report") or []:
            if isinstance(part, dict) and part.get("section"):
                titles.setdefault(str(part["section"]), "")
    return titles


def _cell(v: Any, column: str) -> str:
    return f"<td class='n'>{_num(v, column)}</td>" if isinstance(v, int | float) and not isinstance(v, bool) \
        else f"<td>{escape('' if v is None else str(v))}</td>"


def _render_section(doc: dict[str, Any], title: str, empty: str) -> str:
    """One section: the tables of every node that filled it as one table (node first), a row
    for each node that declared it and ended without filling it, then the figures."""
    from pipeline.plots import block_errors_png

    parts = _parts(doc).get(title, [])
    tables = [(n, t) for n, t in parts if t.get("kind") == "table"]
    columns = ["node", *(str(c) for c in tables[0][1].get("columns", []))] if tables else ["node", "note"]
    body, statuses = [], []
    for n, t in tables:
        status = list(t.get("status") or [])
        for i, row in enumerate(t.get("rows") or []):
            cls = str(status[i]) if i < len(status) else ""
            statuses.append(cls)
            cells = _cell(n.get("id"), "node") + "".join(_cell(v, c) for v, c in zip(row, columns[1:], strict=False))
            body.append(f"<tr class='{escape(cls)}'>{cells}</tr>")
    filled = {id(n) for n, _ in parts}
    for n in doc.get("nodes", []):
        declared = any(str(x[0]) == title for x in n.get("sections") or [])
        if declared and id(n) not in filled:
            what = f"{n.get('stage')} node {n.get('status')}: {n.get('error') or n.get('reason') or ''}".strip()
            statuses.append("not-run")
            body.append(f"<tr class='not-run'>{_cell(n.get('id'), 'node')}"
                        f"<td colspan='{len(columns) - 1}'>{escape(what)}</td></tr>")
    figures = []
    for n, f in parts:
        if f.get("kind") != "figure":
            continue
        png = block_errors_png(list(f.get("points") or []), str(f.get("title", "")), f.get("mark"))
        figures.append(f"<figure>{_img(png, str(f.get('title', '')))}<figcaption>"
                       f"{escape(str(n.get('id')) + ' / ' + str(f.get('caption', '')))}</figcaption></figure>")
    if not body and not figures:
        return f"<p class='muted'>{escape(empty or 'Nothing in this run.')}</p>"
    html = ""
    if any(statuses):
        counts = {k: statuses.count(k) for k in ("pass", "fail", "not-run", "ungated")}
        html += (f"<p>{counts['pass']} passed, {counts['fail']} failed, {counts['not-run']} not run (a check that "
                 f"did not run is not a pass), {counts['ungated']} measured with no gate set.</p>")
    if body:
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        html += f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    notes = dict.fromkeys(str(t.get("note")) for _, t in tables if t.get("note"))
    html += "".join(f"<p class='muted'>{escape(x)}</p>" for x in notes)
    return html + "".join(figures)


def _section(fn: Any, *args: Any) -> str:
    """One section; input it cannot make sense of costs that section only, not the report."""
    try:
        return str(fn(*args))
    except Exception as e:  # a damaged detail costs its section, not the whole report
        return f"<p class='fail'>This section could not be rendered ({escape(type(e).__name__)}: {escape(str(e)[:300])}).</p>"


def render_html(doc: dict[str, Any]) -> str:
    tool = ", ".join(f"{k} {v}" for k, v in (doc.get("toolchain") or {}).items())
    result = str(doc.get("result", ""))
    gates = [g for n in doc.get("nodes", []) for g in n.get("gates") or [] if isinstance(g, dict)]
    missed = sum(not g.get("passed") for g in gates)
    checked = (f"{len(gates)} parity gates checked, {missed} missed" if gates
               else "no parity gate was checked in this run")
    sections = [("Stage timings and cache hits", _section(_timings, doc))]
    sections += [(t, _section(_render_section, doc, t, empty)) for t, empty in section_titles(doc).items()]
    body = "".join(f"<h2>{escape(t)}</h2>{html}" for t, html in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>vlmforge report: {escape(str(doc.get('config_name', '')))}</title><style>{CSS}</style></head><body>"
        f"<h1>vlmforge build report: {escape(str(doc.get('config_name', '')))}</h1>"
        f"<p>result: <span class='{'pass' if result == 'ok' else 'fail'}'>{escape(result)}</span> · "
        f"config <code>{escape(str(doc.get('config', '')))}</code> · started {escape(str(doc.get('started', '')))} · "
        f"{_num(doc.get('wall_seconds'))} s wall · executor {escape(str(doc.get('executor', 'local')))} · {escape(checked)}</p><p class='muted'>toolchain: {escape(tool)}</p>"
        f"{body}</body></html>\n"
    )


def write_html_report(run_dir: Path, doc: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html`` from ``doc`` (default: the folder's ``report.json``)."""
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
    out = run_dir / "report.html"
    # atomic (pipeline.fsutil): a full disk is one line and exit 1, the previous report.html
    # stays; mode 0644, a report is for sharing
    atomic_write_text(out, render_html(doc))
    return out
