"""The device runtime installs and runs alone: a fresh venv with only ``vlmforge[runtime]`` and
onnxruntime (no torch, no transformers, no onnx) checks the FP16 package of the tiny default and
generates exactly the tokens PyTorch's ``model.generate`` gives in the main venv (slow: it
installs from the registry into a new venv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages.lib.runtime import archive
from tests.runtime_package import PROMPT, REPO, model_path, shared_package

NEW_TOKENS = 16


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _torch_tokens(model: Path, image: Path) -> list[int]:
    """The reference in this venv: the checkpoint's own processor + ``model.generate`` (greedy)."""
    from PIL import Image

    from stages.lib.checkpoints.local import load_model, load_processor
    from stages.lib.hostside.generate import Prompt, torch_generate
    from stages.lib.runtime.prompt import QWEN_VL_TEMPLATE

    ip, tok = load_processor(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, chat_template=QWEN_VL_TEMPLATE, tokenize=False, add_generation_prompt=True)
    out = ip(images=[Image.open(image).convert("RGB")], return_tensors="np")
    grid = np.asarray(out["image_grid_thw"], np.int64)
    ids = np.asarray([tok(text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(grid[0])) // 4)))["input_ids"]],
                     np.int64)
    prompt = Prompt(ids, np.ones_like(ids), np.asarray(out["pixel_values"], np.float32), grid)
    return [int(t) for t in torch_generate(load_model(model, dtype="fp32"), prompt, NEW_TOKENS)[0]]


@pytest.mark.slow
def test_fresh_venv_with_only_the_runtime_extra_checks_and_generates(tmp_path_factory: pytest.TempPathFactory,
                                                                    tmp_path: Path) -> None:
    from PIL import Image

    from stages.lib.hostside.vision import synthetic_image

    tar = shared_package(tmp_path_factory)
    pkg = archive.extract(tar, tmp_path / "pkg")
    image = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(150, 190, 7)).save(image)

    # the project as a local path install: a copy of what the wheel is built from (nothing is
    # written into the repository: no build/ or egg-info beside the developer's tree)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, src / name)
    for pkg_dir in ("pipeline", "stages"):
        shutil.copytree(REPO / pkg_dir, src / pkg_dir, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = tmp_path / "venv"
    t0 = time.monotonic()
    r = _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = _run([py, "-m", "pip", "install", "-q", "--no-cache-dir", "-c", "constraints.txt", ".[runtime]", "onnxruntime"],
             src, env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    installed = time.monotonic() - t0

    work = tmp_path / "work"  # run outside any source tree: imports come from the venv alone
    work.mkdir()
    for mod in ("torch", "transformers", "onnx"):
        r = _run([py, "-c", f"import {mod}"], work, env)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"{mod} is importable in the runtime venv"
    r = _run([py, "-c", "import stages.lib.runtime as r; print(r.__file__)"], work, env)
    assert r.returncode == 0 and str(venv) in r.stdout, r.stdout + r.stderr

    r = _run([py, "-m", "stages.lib.runtime.cli", "check", pkg, "--backend", "onnxruntime"], work, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS rt-rtx4090: passed on onnxruntime" in r.stdout
    r = _run([py, "-m", "stages.lib.runtime.cli", "check", tar], work, env)  # the tar, default backend
    assert r.returncode == 0 and "engines not run" in r.stdout, r.stdout + r.stderr
    r = _run([venv / "bin" / "vlmforge", "check", tar, "--json"], work,  # the console script, runtime plugged in
             {**env, "VLMFORGE_COMMAND_MODULES": "stages.lib.runtime.cli"})
    assert r.returncode == 0 and json.loads(r.stdout)["passed"] is True, r.stdout + r.stderr
    r = _run([py, "-m", "stages.lib.runtime.cli", "generate", pkg, "--image", image, "--prompt", PROMPT,
              "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--json", "--backend", "onnxruntime"], work, env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    total = time.monotonic() - t0
    print(f"runtime venv: install {installed:.1f} s, install + check + generate {total:.1f} s")

    ref = _torch_tokens(model_path(tar), image)
    assert got["tokens"] == ref, (got["tokens"], ref)
    assert len(set(ref)) > 4 and got["new_tokens"] == NEW_TOKENS
