"""reference stage: a held-out set disjoint from calibration, deterministic, no pickle, and
PyTorch outputs that agree with each other (vision features = merged rows, greedy = argmax)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError
from stages.lib.qdq.calibset import synthetic_image
from stages.lib.reference_io import NPZ, load_reference
from stages.reference import STAGE, check_held_out

BASE: dict[str, Any] = {"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"}, "targets": ["rtx4090"]}


def _params(**over: Any) -> dict[str, Any]:
    return STAGE.params(BuildConfig.model_validate({**BASE, **over}), None)


def test_default_held_out_set_differs_from_calibration() -> None:
    p = _params()
    check_held_out(p)  # the defaults are disjoint
    assert p["seed"] != p["calibration"]["seed"]
    assert not set(map(tuple, p["image_sizes"])) & set(map(tuple, p["calibration"]["image_sizes"]))


def test_overlap_with_calibration_is_refused() -> None:
    with pytest.raises(StageError, match="calibration.seed"):
        check_held_out(_params(verify={"seed": 7}, calibration={"seed": 7}))
    with pytest.raises(StageError, match="other shapes"):
        check_held_out(_params(verify={"image_sizes": [[224, 224]]}))


def test_synthetic_images_are_deterministic_and_structured() -> None:
    a = synthetic_image(112, 168, np.random.default_rng([4321, 0]))
    b = synthetic_image(112, 168, np.random.default_rng([4321, 0]))
    c = synthetic_image(112, 168, np.random.default_rng([4321, 1]))
    assert a.shape == (112, 168, 3) and a.dtype == np.uint8
    assert (a == b).all() and not (a == c).all()
    assert a.std() > 20  # not a flat image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.lib.checkpoints.tiny import generate_tiny

    folder = tmp_path_factory.mktemp("checkpoint")
    generate_tiny("qwen2_5_vl", folder / "model", seed=0)
    (folder / "checkpoint.json").write_text(json.dumps({"path": "model", "family": "qwen2_5_vl"}))
    return folder


def _run(checkpoint: Path, out: Path, **over: Any) -> Any:
    out.mkdir()
    ctx = StageContext(node_id="reference", params=_params(**over), inputs={"checkpoint": checkpoint}, out=out,
                       target=None, external=[])
    return STAGE.run(ctx)


def test_reference_artifact(checkpoint: Path, tmp_path: Path) -> None:
    res = _run(checkpoint, tmp_path / "a", verify={"generate_tokens": 6})
    meta, samples = load_reference(tmp_path / "a")
    assert res.metrics["samples"] == len(samples) == 2
    assert [s["image_size"] for s in meta["samples"]] == [[112, 168], [196, 140]]
    with np.load(tmp_path / "a" / NPZ, allow_pickle=False) as z:  # loadable without pickle
        assert all(z[k].dtype != object for k in z.files)
    for s, m in zip(samples, meta["samples"], strict=True):
        seq = s["input_ids"].shape[1]
        n_img = int((s["input_ids"] == meta["image_token_id"]).sum())
        assert n_img == m["image_tokens"] == s["vision_features"].shape[0]
        assert s["logits"].shape == (1, seq, meta["vocab_size"]) and s["position_ids"].shape == (3, 1, seq)
        assert s["generated"].shape == (6,)
        # greedy: the first generated token is the argmax of the prefill's last logits
        assert int(s["generated"][0]) == int(np.argmax(s["logits"][0, -1]))
        # the decoder's isolated input holds exactly the reference image features at the placeholders
        mask = s["input_ids"][0] == meta["image_token_id"]
        np.testing.assert_array_equal(s["inputs_embeds"][0][mask], s["vision_features"])
        assert len(set(s["generated"].tolist())) > 1  # a model that repeats one token proves nothing
    # computed once, identically: a second run gives the same arrays
    _run(checkpoint, tmp_path / "b", verify={"generate_tokens": 6})
    _, again = load_reference(tmp_path / "b")
    for s, t in zip(samples, again, strict=True):
        assert s.keys() == t.keys()
        for k in s:
            np.testing.assert_array_equal(s[k], t[k], err_msg=k)


def test_vision_only_checkpoint(tmp_path: Path) -> None:
    from stages.lib.export.cnn import generate_tiny_cnn

    ck = tmp_path / "ck"
    generate_tiny_cnn(ck / "model", seed=0)
    (ck / "checkpoint.json").write_text(json.dumps({"path": "model", "family": "resnet"}))
    res = _run(ck, tmp_path / "out")
    meta, samples = load_reference(tmp_path / "out")
    assert meta["vision_only"] is True and res.metrics["image_sizes"] == [[112, 168], [196, 140]]
    for s, (h, w) in zip(samples, [(112, 168), (196, 140)], strict=True):
        assert s["pixel_values"].shape == (1, 3, h, w) and s["pixel_values"].dtype == np.float32
        assert s["vision_features"].ndim == 2 and s["logits"].shape == (1, 10)
        assert abs(float(s["pixel_values"].mean())) < 3  # normalised, not raw 0..255


# --- real held-out data: verify.images / verify.prompts (issue 13) ------------------------------


def _photos(folder: Path, n: int, size: tuple[int, int] = (150, 230), seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = synthetic_image(*size, np.random.default_rng([seed, 99, i]))
        out.append(folder / f"photo_{i}.png")
        Image.fromarray(img).save(out[-1])
    return out


def test_held_out_images_and_prompts_come_from_the_folder(checkpoint: Path, tmp_path: Path) -> None:
    _photos(tmp_path / "held", 3)
    (tmp_path / "p.jsonl").write_text('{"prompt": "what is written on the sign"}\n{"prompt": "count the cars"}\n')
    res = _run(checkpoint, tmp_path / "a", verify={"images": str(tmp_path / "held"), "prompts": str(tmp_path / "p.jsonl"),
                                                 "generate_tokens": 4})
    meta, samples = load_reference(tmp_path / "a")
    assert [m["image"] for m in meta["samples"]] == ["photo_0.png", "photo_1.png"]  # the first `samples`, sorted
    assert [m["image_size"] for m in meta["samples"]] == [[112, 168], [196, 140]]  # resized to verify.image_sizes
    assert [m["prompt"] for m in meta["samples"]] == ["what is written on the sign", "count the cars"]
    assert str(tmp_path / "held") in res.metrics["held_out"] and meta["held_out"] == res.metrics["held_out"]
    # the stage's key follows the files' content: the external list names every image and the prompts
    cfg = BuildConfig.model_validate({**BASE, "verify": {"images": str(tmp_path / "held"),
                                                         "prompts": str(tmp_path / "p.jsonl")}})
    assert STAGE.external is not None and {p.name for p in STAGE.external(cfg)} >= {"photo_2.png", "p.jsonl"}
    synthetic = _run(checkpoint, tmp_path / "b", verify={"generate_tokens": 4})
    assert synthetic.metrics["held_out"].startswith("synthetic images")


def _config_error(tmp_path: Path, text: str) -> str:
    from pipeline.config_io import load_config
    from pipeline.errors import ConfigError

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_held_out_folders_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from pipeline.config_io import load_config

    cal, held = _photos(tmp_path / "cal", 2), _photos(tmp_path / "held", 2, seed=1)
    (tmp_path / "held" / "copy.png").write_bytes(cal[1].read_bytes())
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    vlm = "model: {generate: tiny, family: qwen2_5_vl}\ntargets: [rtx4090]\n"
    msg = _config_error(tmp_path, vlm + "calibration: {source: folder, images: cal, prompts: p.jsonl}\n"
                                        "verify: {images: held}\n")
    assert "verify.images" in msg and "copy.png" in msg and "photo_1.png" in msg
    assert "does not exist" in _config_error(tmp_path, vlm + "verify: {images: nowhere}\n")
    assert "without verify.images" in _config_error(tmp_path, vlm + "verify: {prompts: p.jsonl}\n")
    # a VLM calibrates on prompts too; a vision-only model needs none
    assert "calibration.prompts" in _config_error(tmp_path, vlm + "calibration: {source: folder, images: cal}\n")
    (tmp_path / "held" / "copy.png").unlink()
    (tmp_path / "ok.yaml").write_text("model: {generate: cnn-tiny}\ntargets: [rtx4090]\n"
                                      "calibration: {source: folder, images: cal}\nverify: {images: held}\n")
    cfg = load_config(tmp_path / "ok.yaml")
    assert cfg.verify.images == held[0].parent and cfg.calibration.prompts is None
