"""Config errors: exit 2 with one line naming the file, the key path and what was expected."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import BASE_CONFIG, Cli


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_key(cli: Cli):
    cfg = cli.config(BASE_CONFIG + "engine: {workspace: 10}\n")
    line = _one_line_error(cli("plan", str(cfg), check=None))
    assert str(cfg) in line and "engine.workspace: unknown key" in line


def test_missing_checkpoint_path(cli: Cli):
    cfg = cli.config("model: {checkpoint: ./nowhere}\ntargets: [rtx4090]\n")
    line = _one_line_error(cli("build", str(cfg), check=None))
    assert "model.checkpoint" in line and "nowhere does not exist" in line


def test_target_not_in_catalog(cli: Cli):
    cfg = cli.config(BASE_CONFIG.replace("rtx4090", "rtx9999"))
    line = _one_line_error(cli("build", str(cfg), check=None))
    assert "targets[1]: 'rtx9999' is not in the target catalog" in line and "rtx4090" in line
    line = _one_line_error(cli("build", str(cli.config()), "--target", "gtx480", check=None))
    assert "--target: 'gtx480'" in line


def test_wrong_type_and_bad_value(cli: Cli):
    line = _one_line_error(cli("plan", str(cli.config(BASE_CONFIG + "export: {opset: 11}\n")), check=None))
    assert "export.opset" in line and "greater than or equal to 19" in line
    line = _one_line_error(cli("plan", str(cli.config(BASE_CONFIG + "precision: {vision: int3}\n")), check=None))
    assert "precision.vision" in line and "int3" in line


def test_fp8_on_an_sm_without_it(cli: Cli):
    cfg = cli.config(BASE_CONFIG.replace("[rtx3090, rtx4090]", "[rtx3090]"))
    line = _one_line_error(cli("build", str(cfg), "--precision", "fp8", check=None))
    assert "fp8 needs SM >= 8.9" in line and "rtx3090 is SM 8.6" in line
    assert "rtx4090" in line and "h100" in line  # lists the targets that have FP8


def test_missing_and_invalid_yaml(cli: Cli, tmp_path: Path):
    line = _one_line_error(cli("plan", str(tmp_path / "nope.yaml"), check=None))
    assert "config file not found" in line
    bad = cli.config("model: [unclosed\n")
    assert "not valid YAML" in _one_line_error(cli("plan", str(bad), check=None))
    assert cli("plan", check=None).returncode == 2  # argparse usage error


def test_include_composes_a_shared_base(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("targets: [rtx4090]\nengine: {workspace_mb: 64, timing_cache: false}\n")
    (tmp_path / "m.yaml").write_text("include: base.yaml\nmodel: {generate: tiny, family: qwen3_vl}\nengine: {workspace_mb: 128}\n")
    cfg = load_config(tmp_path / "m.yaml")
    assert cfg.name == "m" and cfg.targets == ("rtx4090",)
    assert cfg.engine.workspace_mb == 128 and cfg.engine.timing_cache is False
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # frozen
        cfg.engine.workspace_mb = 1  # type: ignore[misc]


def test_include_cycle(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_gates_override_one_precision_keeps_defaults(tmp_path: Path):
    (tmp_path / "g.yaml").write_text(BASE_CONFIG + "gates: {int8: {cosine: 0.95}}\n")
    cfg = load_config(tmp_path / "g.yaml")
    assert cfg.gates["int8"].cosine == 0.95 and cfg.gates["int8"].norm_ratio == 0.25
    assert cfg.gates["fp16"].cosine == 0.9999


def test_shipped_configs_validate():
    repo = Path(__file__).resolve().parent.parent
    for p in sorted((repo / "configs").glob("*.yaml")):
        if p.name != "targets.yaml":
            load_config(p)


def test_image_size_outside_the_vision_profile(cli: Cli):
    cfg = cli.config(BASE_CONFIG + "verify: {image_sizes: [[112, 112], [896, 896]]}\n")
    line = _one_line_error(cli("build", str(cfg), check=None))
    assert "verify.image_sizes[1]: image 896x896 is outside the vision profile" in line
    assert "max_image 448x448" in line


def test_model_source_byo_onnx_alone_or_exactly_one(tmp_path: Path):
    """model.vision_onnx alone is a whole (vision-only) model; no source, or two, is refused."""
    (tmp_path / "net.onnx").write_bytes(b"\x08\x07")  # existence is all the config checks
    byo = "model:\n  vision_onnx: {path: net.onnx, input_name: image, resize: [64, 64]}\ntargets: [rtx4090]\n"
    (tmp_path / "byo.yaml").write_text(byo)
    cfg = load_config(tmp_path / "byo.yaml")
    assert cfg.model.checkpoint is None and cfg.model.generate is None
    assert cfg.model.vision_onnx is not None and cfg.model.vision_onnx.path == tmp_path / "net.onnx"
    assert cfg.model.vision_onnx.resize == (64, 64)
    (tmp_path / "none.yaml").write_text("model: {seed: 1}\ntargets: [rtx4090]\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "none.yaml")
    assert all(k in str(e.value) for k in ("model.checkpoint", "model.generate", "model.vision_onnx"))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "two.yaml").write_text("model: {checkpoint: ck, generate: tiny, family: qwen2_vl}\ntargets: [rtx4090]\n")
    with pytest.raises(ConfigError, match="model.checkpoint .*model.generate, not both"):
        load_config(tmp_path / "two.yaml")
