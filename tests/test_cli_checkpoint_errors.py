"""A bad user checkpoint fails the build with one line naming the problem, not a traceback."""

import json
from pathlib import Path

from tests.conftest import Cli


def _failed_lines(r) -> list[str]:
    """A bad checkpoint is found at plan time (the checkpoint stage's preflight): exit 2, one
    line, nothing built."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.startswith("vlmforge: error:")]


def test_unsupported_architecture(tmp_path: Path):
    cli = Cli(tmp_path, stages="stages.checkpoint")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cfg = cli.config("model: {checkpoint: ./llama}\ntargets: [rtx4090]\n")
    lines = _failed_lines(cli("build", str(cfg), check=None))
    assert len(lines) == 1 and "unsupported checkpoint" in lines[0] and "qwen2_5_vl" in lines[0]
    assert _failed_lines(cli("plan", str(cfg), check=None)) == lines  # plan says it too, exit 2
    assert not (tmp_path / "artifacts" / "cache").exists()


def test_missing_shard(tmp_path: Path):
    cli = Cli(tmp_path, stages="stages.checkpoint")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    (ck / "model-00001-of-00002.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = cli.config("model: {checkpoint: ./ck}\ntargets: [rtx4090]\n")
    lines = _failed_lines(cli("build", str(cfg), check=None))
    assert len(lines) == 1 and "missing shard model-00002-of-00002.safetensors" in lines[0]
