"""Faults around the report writers: a full disk (injected, and a real full tmpfs) gives one line
and exit 1, leaves no temp file and keeps the previous report / lock file; report.html needs
report.json alone (a cache entry that vanished since the build takes nothing from it), and a part
it cannot make sense of costs its section, never the report."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import fsutil
from pipeline.errors import OutputError, VlmforgeError
from pipeline.plots import save_png
from pipeline.report import write_lock, write_report
from pipeline.report_html import render_html, write_html_report
from tests.test_report_html import _node, sample_doc

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and fsutil.TMP_MARK in p.name]


def disk_full(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on os.write fails with ENOSPC on fsutil's temp files, the first time after half
    the bytes went out (a partial temp file that must not survive); other descriptors write as
    usual. Returns the temp files it hit."""
    real = os.write
    hit: list[str] = []

    def write(fd: int, data: Any) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if not (Path(name).name.startswith(".") and fsutil.TMP_MARK in name):
            return real(fd, data)
        hit.append(name)
        if len(hit) == 1 and len(data) > 1:
            return real(fd, bytes(data[: len(data) // 2]))
        raise ENOSPC

    monkeypatch.setattr(os, "write", write)
    return hit


@pytest.mark.parametrize("data", ["new text ✓\n" * 500, b"\x89PNG" + bytes(range(256)) * 40])
def test_atomic_write_disk_full_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               data: str | bytes) -> None:
    f = tmp_path / "sub" / "report.json"
    f.parent.mkdir()
    f.write_text("old")
    hit = disk_full(monkeypatch)
    with pytest.raises(OutputError) as e:
        fsutil.atomic_write_text(f, data) if isinstance(data, str) else fsutil.atomic_write_bytes(f, data)
    assert str(e.value) == f"{f}: cannot write (No space left on device)"
    assert e.value.exit_code == 1 and isinstance(e.value, VlmforgeError) and "\n" not in str(e.value)
    assert hit, "the fault was not injected"
    assert f.read_text() == "old" and _tmp_leftovers(tmp_path) == []
    new = tmp_path / "never-there.md"
    with pytest.raises(OutputError):
        fsutil.atomic_write_text(new, "x")
    assert not new.exists() and _tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize("fails", ["fsync", "replace", "fchmod"])
def test_atomic_write_other_os_errors_clean_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    f = tmp_path / "x.lock"
    f.write_text("old")

    def boom(*a: Any, **k: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, fails, boom)
    with pytest.raises(OutputError, match=r"x\.lock: cannot write \(Input/output error\)$"):
        fsutil.atomic_write_text(f, "new")
    assert f.read_text() == "old" and _tmp_leftovers(tmp_path) == []


def test_atomic_write_ok_mode_and_folder_that_cannot_be_made(tmp_path: Path) -> None:
    f = fsutil.atomic_write_text(tmp_path / "a" / "b" / "report.md", "hi")
    assert f.read_text() == "hi" and stat.S_IMODE(f.stat().st_mode) == 0o644
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write"):
        fsutil.atomic_write_text(tmp_path / "file" / "report.md", "x")  # parent is a file
    assert _tmp_leftovers(tmp_path) == []


def test_make_readonly(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / "out").mkdir(parents=True)
    (entry / "out" / "a.onnx").write_bytes(b"a")
    (entry / "manifest.json").write_text("{}")
    (entry / "out" / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").write_text("o")
    fsutil.make_readonly(entry)
    for p in (entry / "out" / "a.onnx", entry / "manifest.json"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0
    assert stat.S_IMODE((tmp_path / "outside").stat().st_mode) & 0o200, "followed a symlink"
    assert stat.S_IMODE((entry / "out").stat().st_mode) & 0o200, "folders stay removable"
    (single := tmp_path / "one").write_text("1")
    single.chmod(0o664)
    fsutil.make_readonly(single)
    assert stat.S_IMODE(single.stat().st_mode) == 0o444
    with pytest.raises(OutputError, match="cannot make read-only"):
        fsutil.make_readonly(tmp_path / "missing")


def _write_all_reports(run: Path, lock: Path, notes: str = "") -> None:
    header = {"config": "c.yaml", "config_name": "c", "result": "ok", "notes": [notes] if notes else []}
    doc = write_report(run, header, [])
    write_html_report(run, doc)
    write_lock(lock, Path("c.yaml"), [])
    save_png(run / "timings.png", b"\x89PNG" + notes.encode())


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


def test_report_writers_on_a_full_disk_keep_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, lock = tmp_path / "run", tmp_path / "locks" / "c.lock"
    _write_all_reports(run, lock)
    before = _snapshot(run, lock.parent)
    assert {Path(p).name for p in before} == {"report.json", "report.md", "report.html", "c.lock", "timings.png"}
    hit = disk_full(monkeypatch)
    writers = {
        "report.json": lambda: write_report(run, {"result": "failed"}, []),
        "report.html": lambda: write_html_report(run),
        "c.lock": lambda: write_lock(lock, Path("other.yaml"), []),
        "timings.png": lambda: save_png(run / "timings.png", b"new"),
    }
    for name, writer in writers.items():
        with pytest.raises(OutputError, match=rf"/{name}: cannot write \(No space left on device\)$"):
            writer()
        assert _snapshot(run, lock.parent) == before and _tmp_leftovers(tmp_path) == []
    assert {n for n in writers if any(Path(h).name.startswith(f".{n}.") for h in hit)} == set(writers)


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs CAP_SYS_ADMIN: root on a host or a privileged container)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("real full-disk test: no `mount` command here (the injected-ENOSPC tests still ran)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"real full-disk test: mounting a tmpfs is not permitted here ({r.stderr.strip()[:120]}); "
                    "the injected-ENOSPC tests still ran")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_report_writers_on_a_real_full_tmpfs(full_tmpfs: Path) -> None:
    run, lock = full_tmpfs / "run", full_tmpfs / "locks" / "c.lock"
    _write_all_reports(run, lock)
    before = _snapshot(run, lock.parent)
    with open(full_tmpfs / "filler", "wb", buffering=0) as f:  # fill the disk to the last page
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(OutputError) as e:
        _write_all_reports(run, lock, notes="x" * 20_000)
    assert str(e.value).endswith(": cannot write (No space left on device)")
    assert _snapshot(run, lock.parent) == before and _tmp_leftovers(full_tmpfs) == []


DRIVER = textwrap.dedent("""
    import errno, os, sys
    from pathlib import Path
    from pipeline import fsutil
    from pipeline.cli import main
    real, target = fsutil._write_all, os.environ["FAIL_WRITING"]
    def write_all(fd, data):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{target}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)
    fsutil._write_all = write_all
    sys.exit(main(sys.argv[1:]))
""")


def test_cli_build_on_a_full_disk_is_one_line_and_exit_1(cli: Any) -> None:
    cfg = cli.config()
    cli("build", str(cfg), "--json")
    art = cli.tmp / "artifacts"
    latest = (art / "runs" / "fake" / "latest").resolve()
    before = _snapshot(latest, art / "locks")
    assert {"report.json", "report.md", "report.html", "fake.lock"} <= {Path(p).name for p in before}
    for name in ("fake.lock", "report.json", "report.md", "report.html"):
        r = subprocess.run([sys.executable, "-c", DRIVER, "build", str(cfg), "--json"], cwd=cli.tmp,
                           env={**cli.env, "FAIL_WRITING": name}, capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, (name, r.stdout[-800:], r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("vlmforge: error: "), r.stderr[-2000:]
        assert lines[0].endswith(f"{name}: cannot write (No space left on device)"), lines
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert _tmp_leftovers(art / "runs") == [] and _tmp_leftovers(art / "locks") == []
        assert (art / "runs" / "fake" / "latest").resolve() == latest
        assert _snapshot(latest, art / "locks") == before, f"{name}: the previous report or lock changed"


# --- report.html from report.json alone; damaged parts cost one section ---------------------------


def test_html_needs_no_cache_entry(tmp_path: Path) -> None:
    """Everything the sections show travels in report.json: with the artifacts' cache emptied
    (gc, quarantine) the report is the same page."""
    run = tmp_path / "artifacts" / "runs" / "default" / "1"
    run.mkdir(parents=True)
    (tmp_path / "artifacts" / "cache").mkdir()
    page = write_html_report(run, sample_doc()).read_text()
    assert page == render_html(sample_doc())
    assert "lm_head_MatMul" in page and "fp8: 10" in page and "could not be rendered" not in page


def test_html_parts_of_the_wrong_shape_render() -> None:
    doc = sample_doc()
    quantize = doc["nodes"][1]
    quantize["report"] += [{"kind": "table", "section": "Layers kept in high precision", "columns": ["graph"],
                            "rows": [["vision", "extra", "cells"], []], "status": "junk"}, "junk", 3, {"no": "section"}]
    html = render_html(doc)
    assert "lm_head_MatMul" in html and "could not be rendered" not in html


def test_html_section_that_cannot_render_costs_only_that_section() -> None:
    doc = sample_doc()
    verify = doc["nodes"][3]
    for part in verify["report"]:
        if part["kind"] == "figure":
            part["points"] = 5  # not a list of points: the section cannot draw it
    html = render_html(doc)
    assert "This section could not be rendered" in html
    assert "Engine precision summary" in html and "engine@rtx4090" in html and "lm_head_MatMul" in html


def test_html_failed_node_that_declared_a_section_gets_a_not_run_row() -> None:
    from stages import engine

    doc = sample_doc()
    doc["nodes"].append(_node("engine@rtx3090", "engine", "rtx3090", "failed", [], error="build failed",
                              sections=engine.STAGE.report_sections))
    section = render_html(doc).split("<h2>Engine precision summary</h2>")[1].split("<h2>")[0]
    assert "<tr class='not-run'>" in section and "engine node failed: build failed" in section


def test_write_html_report_unreadable_report_json_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"report\.json: cannot read \(No such file or directory\)$"):
        write_html_report(tmp_path)
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(OutputError, match=r"report\.json: not valid JSON"):
        write_html_report(tmp_path)
