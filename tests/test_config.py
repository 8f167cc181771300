"""Config errors: exit 2 with one line naming the file, the key path and what was expected."""

from pathlib import Path

import pytest

from pipeline.config_io import load_config
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
    assert "FP8 needs SM >= 8.9" in line and "rtx3090 is SM 8.6" in line
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


# --- bad input: one line naming the file, the key and what was expected ---------------------

TINY = "model: {generate: tiny, family: qwen2_vl}\ntargets: [rtx4090]\n"
NAME_RULE = ("a plain build name: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
             "(no '/', no '..')")


def _refused(tmp_path: Path, text: str, name: str = "c.yaml") -> tuple[Path, str]:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    return p, str(e.value)


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "..", ".hidden", "x" * 129])
def test_name_must_be_a_plain_build_name(tmp_path: Path, name: str):
    p, msg = _refused(tmp_path, f"name: '{name}'\n" + TINY)
    assert msg == f"{p}: name: expected {NAME_RULE}, got {name!r}"


def test_name_from_an_odd_file_stem_asks_for_a_name(tmp_path: Path):
    p, msg = _refused(tmp_path, TINY, name="my build.yaml")
    assert msg == f"{p}: name: not set, and the file name 'my build' is not {NAME_RULE}; set name: explicitly"
    (tmp_path / "ok.yaml").write_text("name: fine-1.x_y\n" + TINY)
    assert load_config(tmp_path / "ok.yaml").name == "fine-1.x_y"


def test_bad_name_is_exit_2_one_line_on_the_cli(cli: Cli):
    cfg = cli.config("name: ../../escape\n" + BASE_CONFIG.replace("name: fake\n", ""))
    line = _one_line_error(cli("build", str(cfg), check=None))
    assert line.endswith(f"{cfg}: name: expected {NAME_RULE}, got '../../escape'")
    assert not (cli.tmp / "escape").exists()


@pytest.mark.parametrize(("value", "shown"), [("5", "5"), ("{a: 1}", "{'a': 1}"), ("[a.yaml, 3]", "['a.yaml', 3]")])
def test_include_must_be_file_names(tmp_path: Path, value: str, shown: str):
    p, msg = _refused(tmp_path, f"include: {value}\n" + TINY)
    assert msg == f"{p}: include: expected a file name or a list of file names, got {shown}"


def test_missing_include_names_both_files(tmp_path: Path):
    p, msg = _refused(tmp_path, "include: [gone.yaml]\n" + TINY)
    assert msg == f"{p}: include: {tmp_path / 'gone.yaml'}: config file not found"
    (tmp_path / "sub").mkdir()
    p, msg = _refused(tmp_path, "include: sub\n" + TINY)
    assert msg == f"{p}: include: {tmp_path / 'sub'}: is a folder (expected a YAML config file)"


@pytest.mark.parametrize(("yaml_text", "key", "got"), [
    ("profiles: {vision: {min_image: [-56, 56]}}", "profiles.vision.min_image", "[-56, 56]"),
    ("profiles: {vision: {max_image: [448, 0]}}", "profiles.vision.max_image", "[448, 0]"),
    ("export: {sample_image: [0, 224]}", "export.sample_image", "[0, 224]"),
    ("calibration: {image_sizes: [[224, 224], [-1, 5]]}", "calibration.image_sizes[1]", "[-1, 5]"),
    ("verify: {image_sizes: [[112, -168]]}", "verify.image_sizes[0]", "[112, -168]"),
])
def test_negative_image_sizes_refused(tmp_path: Path, yaml_text: str, key: str, got: str):
    p, msg = _refused(tmp_path, TINY + yaml_text + "\n")
    assert msg == f"{p}: {key}: expected a positive [height, width] in pixels, got {got}"


def test_byo_resize_must_be_positive(tmp_path: Path):
    (tmp_path / "net.onnx").write_bytes(b"\x08\x07")
    p, msg = _refused(tmp_path, "model: {vision_onnx: {path: net.onnx, resize: [64, -64]}}\ntargets: [rtx4090]\n")
    assert msg == f"{p}: model.vision_onnx.resize: expected a positive [height, width] in pixels, got [64, -64]"


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("calibration: {samples: 0}", "calibration.samples: Input should be greater than or equal to 1 (got 0)"),
    ("verify: {generate_tokens: 0}", "verify.generate_tokens: Input should be greater than or equal to 1 (got 0)"),
    ("verify: {prompt_len: -3}", "verify.prompt_len: Input should be greater than or equal to 2 (got -3)"),
    ("profiles: {vision: {max_images: 0}}",
     "profiles.vision.max_images: Input should be greater than or equal to 1 (got 0)"),
    ("verify: {image_sizes: []}",
     "verify.image_sizes: expected at least one [height, width], got []"),
    ("profiles: {decoder: {batch: {min: 0, opt: 1, max: 2}}}",
     "profiles.decoder.batch: expected min >= 1 (a batch of 0 runs nothing), got 0"),
    ("verify: {seed: -1}", "verify.seed: Input should be greater than or equal to 0 (got -1)"),
    ("export: {fp32_vision_blocks: [0, -2]}",
     "export.fp32_vision_blocks[1]: Input should be greater than or equal to 0 (got -2)"),
])
def test_meaningless_counts_refused(tmp_path: Path, yaml_text: str, expected: str):
    p, msg = _refused(tmp_path, TINY + yaml_text + "\n")
    assert msg == f"{p}: {expected}"


def test_calibration_folder_paths_checked_at_load(tmp_path: Path):
    p, msg = _refused(tmp_path, TINY + "calibration: {source: folder, images: nope, prompts: p.jsonl}\n")
    assert msg == (f"{p}: calibration.images: {tmp_path / 'nope'} does not exist (expected a folder of images "
                   f"for calibration.source: folder); calibration.prompts: {tmp_path / 'p.jsonl'} does not "
                   "exist (expected a JSONL file of prompts for calibration.source: folder)")


def _calib_folder(tmp_path: Path, images: list[str], prompts: str) -> str:
    (tmp_path / "imgs").mkdir()
    for n in images:
        (tmp_path / "imgs" / n).write_bytes(b"")  # load time checks names only; stages decode
    (tmp_path / "p.jsonl").write_text(prompts)
    return TINY + "calibration: {source: folder, images: imgs, prompts: p.jsonl}\n"


def test_calibration_folder_contents_checked_at_load(tmp_path: Path):
    imgs, prompts = tmp_path / "imgs", tmp_path / "p.jsonl"
    p, msg = _refused(tmp_path, _calib_folder(tmp_path, ["a.png"], '{"prompt": "x", "image": "b.png"}\n'))
    assert msg == f"{p}: calibration.prompts: {prompts}:1: names image 'b.png', which is not an image in {imgs}"
    prompts.write_text('{"prompt": "x"}\nnot json\n')
    p, msg = _refused(tmp_path, p.read_text())
    assert msg == (f"{p}: calibration.prompts: {prompts}:2: expected "
                   '{"prompt": "...", "image": optional file name in calibration.images}')
    prompts.write_bytes(b'{"prompt": "\xff"}\n')
    p, msg = _refused(tmp_path, p.read_text())
    assert msg == f"{p}: calibration.prompts: {prompts} cannot be read (not UTF-8 text; expected a JSONL file)"
    (imgs / "a.png").unlink()
    p, msg = _refused(tmp_path, p.read_text())
    assert msg.startswith(f"{p}: calibration.images: {imgs} has no images (expected files ending .png, .jpg")


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("verify: {seed: 7}\ncalibration: {seed: 7}",
     "verify.seed: 7 equals calibration.seed, so the held-out set would repeat the calibration images; "
     "expected another verify.seed"),
    ("verify: {image_sizes: [[224, 224]]}",
     "verify.image_sizes: [[224, 224]] are also calibration.image_sizes; expected held-out images of other "
     "shapes (a graph that baked in a shape must fail verification)"),
    ("calibration: {prompt_len: 300}",
     "calibration.prompt_len: a prefill is 300 text tokens + the image block (at least 3 tokens), longer than "
     "profiles.decoder.seq.max 256; expected prompt_len <= 253"),
    ("verify: {prompt_len: 60}\nprofiles: {decoder: {seq: {min: 1, opt: 32, max: 48}}}",
     "verify.prompt_len: a prefill is 60 text tokens + the image block (at least 3 tokens), longer than "
     "profiles.decoder.seq.max 48; expected prompt_len <= 45"),
    ("verify: {generate_tokens: 240}",
     "verify.generate_tokens: generating 240 tokens after a 24-token prompt needs a past of at least 265 "
     "tokens, more than profiles.decoder.past.max 256"),
    ("export: {sample_prompt_len: 300}",
     "export.sample_prompt_len: 300 is outside profiles.decoder.seq (expected 1..256)"),
    ("profiles: {vision: {max_images: 1}}",
     "profiles.vision.max_images: export parity runs 2 verify.image_sizes at once, expected max_images >= 2, "
     "got 1"),
    ("profiles: {vision: {min_image: [8, 8]}}\nverify: {image_sizes: [[16, 112], [112, 168]]}",
     "verify.image_sizes[0]: image 16x112 is too small for the synthetic image set (expected sides of at "
     "least 18 pixels)"),
])
def test_run_time_conflicts_refused_at_load(tmp_path: Path, yaml_text: str, expected: str):
    p, msg = _refused(tmp_path, TINY + yaml_text + "\n")
    assert msg == f"{p}: {expected}"


def test_vision_only_models_skip_the_decoder_length_checks(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("model: {generate: cnn-tiny}\ntargets: [rtx4090]\n"
                                     "profiles: {decoder: {seq: {min: 1, opt: 2, max: 4}}}\n")
    assert load_config(tmp_path / "c.yaml").profiles.decoder.seq.max == 4


def test_accuracy_budget_yaml_off_is_the_word(tmp_path):
    """YAML 1.1 reads a bare off/on as booleans: `accuracy_budget: off` means "off", not cosine 0."""
    from pipeline.config_io import load_config

    p = tmp_path / "c.yaml"
    p.write_text("name: t\nmodel: {generate: tiny, family: qwen2_vl}\ntargets: [rtx4090]\n"
                 "quantize: {vision: {accuracy_budget: off}, decoder: {accuracy_budget: on}}\n")
    cfg = load_config(p)
    assert cfg.quantize.vision.accuracy_budget == "off" and cfg.quantize.decoder.accuracy_budget == "gate"
