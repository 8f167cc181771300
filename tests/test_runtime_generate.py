"""The light device runtime's ``generate`` (stages/lib/runtime) on a real package: the tokens,
EOS and seeded sampling, the prompt (chat template, tokenizer, image preprocessing) without
transformers, usage errors, and what it imports.

The package is the FP16 package of the tiny default (tests/runtime_package.py), built once per
test session; generation runs its ONNX graphs with onnxruntime (no GPU here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.lib.runtime import opened
from tests.runtime_package import PROMPT, REPO, cli, model_path

# --- generate -----------------------------------------------------------------------------------


def test_generate_gives_ortpipelines_tokens_on_the_same_graphs(package: Path, image: Path) -> None:
    from stages.lib.hostside.generate import OrtPipeline
    from stages.lib.runtime import choose, open_backend
    from stages.lib.runtime.generate import run_package

    streamed: list[str] = []
    with opened(package) as pkg:
        backend = open_backend(pkg, choose(pkg, "onnxruntime"))
        gen = run_package(pkg, backend, [image], PROMPT, max_new_tokens=14, stop_at_eos=False,
                          write=streamed.append)
        ref = OrtPipeline.from_folder(pkg.onnx_dir, pkg.onnx_dir).generate(gen.extra["prompt"], 14)
    assert gen.tokens == ref[0].tolist() and len(set(gen.tokens)) > 4
    assert "".join(streamed) == gen.text and gen.stats.new_tokens == 14 and gen.stats.ttft_s > 0
    r = cli("generate", str(package), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "14",
            "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == gen.tokens
    r = cli("generate", str(package), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "14",
            "--ignore-eos")
    assert r.returncode == 0 and r.stdout.strip() == gen.text.strip()
    assert "time to first token" in r.stderr and "tokens/s" in r.stderr


def test_eos_stops_and_sampling_is_seeded(package: Path, image: Path) -> None:
    from stages.lib.runtime import Sampling, choose, open_backend
    from stages.lib.runtime.generate import run_package

    with opened(package) as pkg:
        backend = open_backend(pkg, choose(pkg, "onnxruntime"))
        greedy = run_package(pkg, backend, [image], PROMPT, max_new_tokens=40, stop_at_eos=False)
        s = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=11)
        a = run_package(pkg, backend, [image], PROMPT, max_new_tokens=12, sampling=s, stop_at_eos=False)
        b = run_package(pkg, backend, [image], PROMPT, max_new_tokens=12, sampling=s, stop_at_eos=False)
        stop = set(pkg.runtime["stop_token_ids"])
    assert a.tokens == b.tokens and a.tokens != greedy.tokens[:12]
    if stop & set(greedy.tokens):  # stopping at EOS: the same tokens up to and including it
        first = next(i for i, t in enumerate(greedy.tokens) if t in stop)
        with opened(package) as pkg:
            backend = open_backend(pkg, choose(pkg, "onnxruntime"))
            stopped = run_package(pkg, backend, [image], PROMPT, max_new_tokens=40)
        assert stopped.tokens == greedy.tokens[: first + 1] and stopped.stats.stopped == "eos"


def test_prompt_equals_the_checkpoints_processor(package: Path, image: Path) -> None:
    """Template, tokenizer, resize and patchify without transformers == the HF processor's output."""
    from PIL import Image

    from stages.lib.checkpoints.local import load_processor
    from stages.lib.runtime.prompt import QWEN_VL_TEMPLATE, build_prompt, load_assets

    ip, tok = load_processor(model_path(package))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, chat_template=QWEN_VL_TEMPLATE, tokenize=False, add_generation_prompt=True)
    out = ip(images=[Image.open(image).convert("RGB")], return_tensors="np")
    n = int(np.prod(out["image_grid_thw"][0])) // 4
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
    with opened(package) as pkg:
        assets = load_assets(pkg.tokenizer_dir, pkg.runtime["generation"], pkg.runtime["stop_token_ids"])
        p = build_prompt(assets, pkg.text_spec(), pkg.vision_spec(), [image], PROMPT)
    assert assets.template_source.startswith("built-in")  # the tiny checkpoint ships no chat template
    assert p.input_ids[0].tolist() == ids
    np.testing.assert_array_equal(p.image_grid_thw, out["image_grid_thw"])
    np.testing.assert_allclose(p.pixel_values, out["pixel_values"], rtol=0, atol=1e-6)


def test_bad_generate_usage_is_exit_2(package: Path, tmp_path: Path) -> None:
    r = cli("generate", str(package), "--image", str(tmp_path / "nope.png"), "--prompt", "x")
    assert r.returncode == 2 and "no such file" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    r = cli("generate", str(package), "--image", str(tmp_path / "bad.png"), "--prompt", "x", "--backend", "onnxruntime")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.png'} is corrupt or not an image (PIL cannot identify its format); expected an RGB "
        "image (png, jpg, bmp, webp, gif, tiff)"]
    r = cli("generate", str(package), "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and "--max-new-tokens" in r.stderr


def test_check_and_generate_import_neither_torch_nor_transformers(package: Path, image: Path) -> None:
    code = (
        "import sys\n"
        "from stages.lib.runtime.cli import main\n"
        f"assert main(['check', {str(package)!r}, '--backend', 'onnxruntime', '--json']) == 0\n"
        f"assert main(['generate', {str(package)!r}, '--image', {str(image)!r}, '--prompt', 'hi', "
        "'--max-new-tokens', '3', '--json', '--backend', 'onnxruntime']) == 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx', 'tensorrt', "
        "'tensorrt_rtx_bindings', 'polygraphy', 'onnxscript'})\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import stages.lib.runtime"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert r.returncode == 0 and not imported & {"torch", "transformers", "onnx", "onnxruntime", "tensorrt"}, imported


def test_chat_template_sources_and_refusals(unpacked: Path) -> None:
    from stages.lib.runtime.errors import UsageError
    from stages.lib.runtime.prompt import load_assets, render

    tok = unpacked / "tokenizer"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "cfg:{{ messages[0].role }}"}))
    assert render(load_assets(tok), msgs) == "cfg:user"
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ eos_token }}"}))
    assert render(load_assets(tok), msgs) == "json:<|im_end|>"
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role != 'user' %}{{ raise_exception('only users here') }}{% endif %}"
        "{{ m.content[-1].text }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    a = load_assets(tok)
    assert a.template_source == "tokenizer/chat_template.jinja" and render(a, msgs) == "hello>"
    with pytest.raises(UsageError, match="the chat template refused the prompt: only users here"):
        render(a, [{"role": "system", "content": "x"}])
