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


def _module_graph() -> dict[str, set[str]]:
    """{module: modules of pipeline/ and stages/ it imports}, from the syntax trees. ``from pkg
    import sub`` counts as an import of ``pkg.sub`` when that is a module (not of ``pkg``)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    files = {}
    for f in sorted([*(repo / "pipeline").rglob("*.py"), *(repo / "stages").rglob("*.py")]):
        parts = f.relative_to(repo).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges[mod] |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                subs = {f"{base}.{a.name}" for a in node.names} & set(files)
                edges[mod] |= subs or ({base} & set(files))
        edges[mod].discard(mod)
    return edges


def test_no_import_cycles():
    """No circle in the import graph of pipeline/ and stages/ (top-level or function-level imports)."""
    edges = _module_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def _drawn_graph(text: str) -> dict[str, tuple[bool, set[str]]]:
    """``name[@T] [<- dep[@T], ...]`` lines: the stage graph as the docs draw it, as
    {name: (per target, deps)}. A trailing parenthesis is a remark."""
    import re

    drawn: dict[str, tuple[bool, set[str]]] = {}
    for line in text.splitlines():
        m = re.match(r"^\s{4}(\w+)(@T)?\s*(?:<-\s*([\w@, ]*))?\s*(?:\(.*\))?$", line)
        if m:
            deps = {d.strip().removesuffix("@T") for d in (m.group(3) or "").split(",") if d.strip()}
            drawn[m.group(1)] = (bool(m.group(2)), deps)
    return drawn


def test_docs_draw_the_stage_graph_of_the_code():
    """docs/CONTRACT.md and stages/__init__.py list every stage, per target or not, with the deps
    its declaration has."""
    from pathlib import Path

    import stages
    from pipeline.graph import load_stages

    code = {name: (bool(st.per_target), set(st.deps)) for name, (_, st) in load_stages().items()}
    repo = Path(__file__).resolve().parent.parent
    assert _drawn_graph(stages.__doc__ or "") == code
    assert _drawn_graph((repo / "docs" / "CONTRACT.md").read_text()) == code


def test_pipeline_names_no_stage():
    """The spine is generic: no string in pipeline/ is a stage's name (the HTML report renders
    the sections stages declare; the graph comes from the stage registry)."""
    import ast
    from pathlib import Path

    from pipeline.graph import load_stages

    names = set(load_stages())
    repo = Path(__file__).resolve().parent.parent
    found = []
    for f in sorted((repo / "pipeline").rglob("*.py")):
        tree = ast.parse(f.read_text())
        # a config field that shares a stage's name (model.checkpoint) is named by its validators
        fields = {id(a) for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "field_validator"
                  for a in c.args}
        for node in ast.walk(tree):
            if id(node) in fields:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{f.relative_to(repo)}:{node.lineno} {node.value!r}")
    assert not found, found
