"""The TensorRT path type-checks against `tensorrt-stubs` (full TensorRT's API).

`tensorrt-stubs` 10.13 installs `tensorrt/__init__.pyi` without a py.typed marker (so mypy skips
it and every TensorRT object silently becomes Any) and its generated `.pyi` has syntax errors
(parameters named `in`, a non-default after defaults). This test repairs a copy of the stubs,
puts it on MYPYPATH and runs mypy on the engine modules: the builder/config/network calls are
then checked for real, and a wrong call fails this test.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ["stages/lib/trt/builder.py", "stages/lib/trt/backend.py", "stages/lib/trt/timing_cache.py",
           "stages/lib/parity/engine.py", "stages/engine.py"]
KEYWORDS = "in|from|is|lambda|def|class|global|pass|with|as|import|return|yield|not|and|or"


def _repaired_stubs(dest: Path) -> Path:
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is not None and spec.origin:
        site = Path(spec.origin).parent.parent
    for pkg in ("tensorrt", "tensorrt_bindings"):
        if not (site / pkg).is_dir():
            pytest.fail(f"tensorrt-stubs is not installed ({site / pkg} missing): pip install tensorrt-stubs")
        shutil.copytree(site / pkg, dest / pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for p in dest.rglob("*.pyi"):
        text = re.sub(rf"(?<=[(,] )({KEYWORDS})(?=: )|(?<=\()({KEYWORDS})(?=: )",
                      lambda m: (m.group(1) or m.group(2)) + "_", p.read_text())
        lines = text.split("\n")
        for _ in range(100):  # drop defaults on the few lines where a non-default follows them
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as e:
                i = (e.lineno or 1) - 1
                fixed = re.sub(r" = [^,)]+(?=[,)])", "", lines[i])
                if fixed == lines[i]:
                    pytest.fail(f"cannot repair {p}:{e.lineno}: {e.msg}")
                lines[i] = fixed
        p.write_text("\n".join(lines))
    return dest


@pytest.mark.slow
def test_engine_modules_typecheck_against_tensorrt_stubs(tmp_path: Path) -> None:
    stubs = _repaired_stubs(tmp_path / "stubs")
    ini = tmp_path / "mypy.ini"
    ini.write_text("[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"
                   "[mypy-tensorrt.*]\nignore_errors = True\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n")
    probe = tmp_path / "probe.py"  # proves the stubs are in use: this must fail to type-check
    probe.write_text("import tensorrt\n\ndef f(c: tensorrt.IBuilderConfig) -> None:\n"
                     "    c.set_memory_pool_limit('workspace', 1)\n")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ini), "--follow-imports=silent",
           "--cache-dir", str(tmp_path / ".mypy_cache")]
    bad = subprocess.run([*cmd, str(probe)], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "MemoryPoolType" in bad.stdout, bad.stdout + bad.stderr
    ok = subprocess.run([*cmd, *MODULES], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
