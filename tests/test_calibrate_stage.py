"""The calibrate stage: synthetic and folder sources, artifacts, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError
from stages.calibrate import STAGE
from tests import qdq_stage_fixtures as F

PATCH_DIM = 3 * 2 * 14 * 14  # tiny Qwen2.5-VL: channels * temporal patch * patch²


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    return F.checkpoint(root), F.fuse_folder(root, PATCH_DIM)


def _cfg(**cal) -> BuildConfig:
    return BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                       "targets": ["rtx4090"], "calibration": {"samples": 3, **cal}})


def _run(cfg, upstream, out: Path, fuse: Path | None = None):
    ck, fz = upstream
    out.mkdir(parents=True, exist_ok=True)
    ext = STAGE.external(cfg) if STAGE.external else []
    ctx = StageContext(node_id="calibrate", params=STAGE.params(cfg, None), inputs={"fuse": fuse or fz,
                       "checkpoint": ck}, out=out, target=None, external=ext)
    return STAGE.run(ctx)


def test_synthetic_calibration_writes_ranges(upstream, tmp_path):
    res = _run(_cfg(image_sizes=[[112, 112], [140, 168]], prompt_len=20), upstream, tmp_path)
    assert STAGE.name == "calibrate" and STAGE.deps == ("fuse", "checkpoint")
    for g in ("vision", "decoder"):
        r = json.loads((tmp_path / f"ranges_{g}.json").read_text())
        assert r["samples"] == 3 and r["method"] == "max" and set(r["order"]) == set(r["tensors"])
        z = np.load(tmp_path / f"ranges_{g}.npz")
        assert any(k.startswith("hist_") for k in z.files)
    dec = json.loads((tmp_path / "ranges_decoder.json").read_text())["tensors"]
    # prefill length: prompt_len text tokens + the image block, never a single token
    assert dec["h"]["shape"][1] > 20 and dec["h"]["amax"] > 0
    assert res.metrics["decoder_tensors"] >= 4 and min(res.metrics["decoder_seq_lens"]) > 20
    assert any(k.startswith("chan_ms_") for k in np.load(tmp_path / "ranges_decoder.npz").files)
    feeds = np.load(tmp_path / "feeds_decoder.npz")
    assert {"s0.inputs_embeds", "s1.position_ids"} <= set(feeds.files) and "s2.inputs_embeds" not in feeds.files
    # kept in the types the (FP16) graph declares: the empty past too, as ORT takes it
    assert feeds["s0.inputs_embeds"].dtype == feeds["s0.past_key_values.0.key"].dtype == np.float16
    assert feeds["s0.past_key_values.0.key"].shape[2] == 0


def _folder(tmp: Path, images: dict[str, bytes | None], prompts: list[str]) -> tuple[Path, Path]:
    from PIL import Image

    d = tmp / "imgs"
    d.mkdir()
    for name, data in images.items():
        if data is None:
            Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(d / name)
        else:
            (d / name).write_bytes(data)
    p = tmp / "prompts.jsonl"
    p.write_text("\n".join(prompts))
    return d, p


def test_folder_source_and_external_files(upstream, tmp_path):
    d, p = _folder(tmp_path, {"a.png": None, "b.jpg": None}, ['{"prompt": "red square", "image": "b.jpg"}',
                                                               '{"prompt": "what is left"}'])
    cfg = _cfg(source="folder", images=str(d), prompts=str(p), samples=2, method="percentile")
    assert [x.name for x in STAGE.external(cfg)] == ["a.png", "b.jpg", "prompts.jsonl"]
    res = _run(cfg, upstream, tmp_path / "out")
    assert res.metrics["samples"] == 2 and res.metrics["method"] == "percentile"


def test_empty_folder_is_an_error(upstream, tmp_path):
    d, p = _folder(tmp_path, {}, ['{"prompt": "x"}'])
    cfg = _cfg(source="folder", images=str(d), prompts=str(p))
    with pytest.raises(StageError, match="has no images"):
        _run(cfg, upstream, tmp_path / "out")


def test_corrupt_image_is_named(upstream, tmp_path):
    d, p = _folder(tmp_path, {"good.png": None, "broken.png": b"not a png"}, ['{"prompt": "x"}'])
    cfg = _cfg(source="folder", images=str(d), prompts=str(p), samples=2)
    with pytest.raises(StageError, match=r"broken\.png is corrupt"):
        _run(cfg, upstream, tmp_path / "out")


def test_bad_prompt_line_is_named(upstream, tmp_path):
    d, p = _folder(tmp_path, {"a.png": None}, ['{"prompt": "ok"}', "not json"])
    with pytest.raises(StageError, match=r"prompts.jsonl:2"):
        _run(_cfg(source="folder", images=str(d), prompts=str(p)), upstream, tmp_path / "out")


def test_nan_activation_names_tensor_and_layer(upstream, tmp_path):
    bad = F.fuse_folder(tmp_path / "bad", PATCH_DIM, nan_at="decoder")
    with pytest.raises(StageError, match=r"synthetic-0: NaN/Inf .*decoder\.onnx; first NaN/Inf at tensor 'l0', output of node /bad/log \(Log\)"):
        _run(_cfg(), upstream, tmp_path / "out", fuse=bad)
