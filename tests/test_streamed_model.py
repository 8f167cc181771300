"""The block-streamed FP32 reference computes exactly what the whole loaded model does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from stages.lib.checkpoints.tiny import generate_tiny

    root = tmp_path_factory.mktemp("streamed")
    return {f: generate_tiny(f, root / f, seed=0) for f in FAMILIES}


def _pixels(model: object) -> tuple[object, object]:
    vc = model.config.vision_config  # type: ignore[attr-defined]
    torch.manual_seed(1)
    pv = torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
    return pv, torch.tensor([[1, 4, 4]])


@pytest.mark.parametrize(("family", "keep"), [("qwen2_vl", None), ("qwen2_5_vl", 0), ("qwen3_vl", 200_000),
                                             ("qwen2_5_vl", -1)])
def test_streamed_equals_whole_model(tiny: dict[str, Path], family: str, keep: int | None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.lib.checkpoints import streamed_model as sm
    from stages.lib.checkpoints.local import load_model

    # stream the embedding and lm_head too (in a tiny model they are under the real threshold)
    monkeypatch.setattr(sm, "STREAM_LEAF_BYTES", 1024)
    monkeypatch.setattr(sm, "_available_bytes", lambda: 1_000_000)  # default budget: 0.35 MB kept
    whole = load_model(tiny[family], "fp32")
    streamed = sm.load_streamed(tiny[family], "fp32", keep_bytes=keep)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, streamed(input_ids=ids).logits)
        a = whole.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        b = streamed.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(a, b)
        pv, grid = _pixels(whole)
        va = whole.model.get_image_features(pv, grid, return_dict=True).pooler_output
        vb = streamed.model.get_image_features(pv, grid, return_dict=True).pooler_output
        assert all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))
    # between calls, every block is back on meta: only the resident modules hold memory
    lm = streamed.model.language_model
    assert all(p.is_meta for p in lm.layers.parameters())
    assert lm.embed_tokens.weight.is_meta and streamed.lm_head.weight.is_meta
    resident = sum(p.numel() for p in streamed.parameters() if not p.is_meta)
    assert resident < 0.05 * sum(p.numel() for p in whole.parameters())


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of checkpoint ``src`` whose weights file holds ``edit(state)``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_hub_layout_names_load(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Original hub checkpoints name the text model ``model.*`` and the ViT ``visual.*``."""

    from stages.lib.checkpoints.local import load_model
    from stages.lib.checkpoints.streamed_model import load_streamed

    src = tiny["qwen2_5_vl"]
    dst = _rewrite(src, tmp_path / "hub", lambda state: {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in state.items()})
    ids = torch.randint(0, 400, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_model(src, "fp32")(input_ids=ids).logits,
                           load_streamed(dst, "fp32")(input_ids=ids).logits)


def test_missing_tensor_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:

    from pipeline.stage import StageError
    from stages.lib.checkpoints.streamed_model import load_streamed

    gone = "model.language_model.layers.2.mlp.down_proj.weight"
    dst = _rewrite(tiny["qwen3_vl"], tmp_path / "cut", lambda state: {k: v for k, v in state.items() if k != gone})
    with pytest.raises(StageError) as e:
        load_streamed(dst, "fp32")
    assert gone in str(e.value) and str(dst) in str(e.value) and "\n" not in str(e.value)
    assert json.loads((dst / "config.json").read_text())  # the input is untouched
