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
