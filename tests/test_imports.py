"""`pipeline` and the stage declarations must import without the heavy toolchain."""

import subprocess
import sys
import time


def test_pipeline_and_stage_declarations_do_not_import_torch():
    code = (
        "import sys, pipeline, pipeline.cli, pipeline.runner, pipeline.graph;"
        "from pipeline.graph import load_stages; load_stages();"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx_bindings', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_instant():
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    assert "plan" in r.stdout and "build" in r.stdout
    assert time.time() - t0 < 5  # generous for a loaded CI box; typically ~0.1 s


def _imports(path) -> set[str]:
    """Every module a file imports (top level or inside functions), from its syntax tree."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_dependencies_point_one_way():
    """spine <- stages <- domain packages: pipeline imports no stage code; a library module never
    imports a stage module, and a stage never imports another stage."""
    from pathlib import Path

    import stages

    repo = Path(__file__).resolve().parent.parent
    stage_modules = set(stages.STAGE_MODULES)
    wrong = []
    for f in sorted((repo / "pipeline").rglob("*.py")):
        # the spine reaches the stage layer only through its two registries, by name
        bad = {m for m in _imports(f) if m.startswith("stages")} - {"stages"}
        wrong += [f"{f.relative_to(repo)} imports {m}" for m in sorted(bad)]
    for f in sorted((repo / "stages").rglob("*.py")):
        mod = ".".join(f.relative_to(repo).with_suffix("").parts)
        bad = {m for m in _imports(f) if m in stage_modules and m != mod}
        wrong += [f"{f.relative_to(repo)} imports stage module {m}" for m in sorted(bad)]
    assert not wrong, wrong
