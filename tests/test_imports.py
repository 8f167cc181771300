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
