"""Stamped vision export (``stages.lib.export.vision_stamp``): the same graph as tracing every block.

The tiny test models have 2-3 blocks, all of which the template traces; these checkpoints have
the released layouts at tiny widths and enough depth that most blocks are stamped: Qwen2.5-VL
with window and full-attention blocks, Qwen3-VL with three deepstack taps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.stage import StageError
from stages.lib.export import vision_stamp as vs

TINY: dict[str, dict[str, Any]] = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 16, "vocab_size": 512, "mrope_section": [2, 3, 3]},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2}}
# released name -> vision blocks: Qwen2.5-VL-3B's full attention kept at block 7 of 12;
# Qwen3-VL-8B's deepstack taps at the same relative places, [3, 5, 8] of 9
DEEP = {"qwen2_5_vl": ("qwen2.5-vl-3b", 12), "qwen3_vl": ("qwen3-vl-8b", 9)}


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from stages.lib.checkpoints.released import write_random_checkpoint

    return {fam: write_random_checkpoint(name, tmp_path_factory.mktemp(fam) / "ck", text_layers=1,
                                         vision_blocks=blocks, widths=TINY) for fam, (name, blocks) in DEEP.items()}


def _params(mode: str, fp32_blocks: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"dtype": "fp16", "opset": 18, "fp32_vision_blocks": list(fp32_blocks), "sample_image": [112, 112],
            "seed": 0, "vision_export": mode}


def _export_and_run(ckpt: Path, family: str, out: Path, params: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    from stages.lib.export.vision import export_graph, images_at
    from stages.lib.hostside import vision as hv
    from stages.lib.ortsession import ort_session

    out.mkdir()
    facts = export_graph(out, ckpt, family, params)
    pvals, grid = images_at([[84, 140], [56, 56]], facts["spec"], facts["image_proc"], 3)  # unlike the sample
    feeds = hv.vision_inputs(facts["spec"], pvals, grid)
    sess = ort_session(out / "vision.onnx")
    return facts, sess.run(None, {n: feeds[n] for n in hv.input_names(facts["spec"])})


def test_template_is_first_of_each_kind_taps_and_last() -> None:
    kinds = ["window"] * 7 + ["full"] + ["window"] * 7 + ["full"]
    assert vs.template_blocks(kinds, []) == [0, 7, 15]
    assert vs.template_blocks(["full"] * 27, [8, 16, 24]) == [0, 8, 16, 24, 26]
    assert vs.template_blocks(["full", "full+fp32", "full"], []) == [0, 1, 2]
    assert vs.template_blocks([], []) == []


@pytest.mark.parametrize(("family", "fp32_blocks", "traced"), [
    ("qwen2_5_vl", (), [0, 7, 11]),
    ("qwen2_5_vl", (2, 9), [0, 2, 7, 11]),  # FP32 islands are a kind of their own
    ("qwen3_vl", (), [0, 3, 5, 8]),
])
def test_stamped_graph_computes_what_the_traced_one_does(deep: dict[str, Path], tmp_path: Path, family: str,
                                                         fp32_blocks: tuple[int, ...], traced: list[int]) -> None:
    import onnx_ir as ir

    from stages.lib.segments.cuts import cuts_from_name_scopes, layer_of

    n_blocks = DEEP[family][1]
    got, outs = _export_and_run(deep[family], family, tmp_path / "stamp", _params("stamp", fp32_blocks))
    ref, want = _export_and_run(deep[family], family, tmp_path / "trace", _params("trace", fp32_blocks))
    assert got["blocks"] == f"stamp (blocks {traced} traced, {n_blocks - len(traced)} stamped)"
    assert ref["blocks"] == "trace (every block)"
    assert len(outs) == len(want) == (2 if family == "qwen3_vl" else 1)
    for a, b in zip(outs, want, strict=True):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=1e-6)

    stamped, traced_model = ir.load(tmp_path / "stamp" / "vision.onnx"), ir.load(tmp_path / "trace" / "vision.onnx")
    # every block under its own name scope (quantize's block cuts and the layer report read them)
    assert len(cuts_from_name_scopes(stamped, "blocks")) == n_blocks

    def per_block(model: ir.Model) -> list[int]:
        counts = [0] * n_blocks
        for node in model.graph:
            if (b := layer_of(node, "blocks")) is not None:
                counts[b] += 1
        return counts

    assert per_block(stamped)[1:] == per_block(traced_model)[1:]
    # each block's own weights, under the parameter's name, once
    def params(model: ir.Model) -> list[str]:
        return sorted(n for n in model.graph.initializers if n.startswith("visual."))

    assert params(stamped) == params(traced_model) and len(params(stamped)) > 12 * n_blocks
    for name in (f"visual.blocks.{n_blocks - 2}.attn.qkv.weight", "visual.blocks.1.attn.proj.weight"):
        a, b = stamped.graph.initializers[name].const_value, traced_model.graph.initializers[name].const_value
        assert a is not None and b is not None and np.array_equal(a.numpy(), b.numpy())


def test_a_refused_stamp_traces_every_block_and_says_why(deep: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> int:
        raise StageError("block 3 reads ['a', 'b'] from the residual stream, expected one value")

    monkeypatch.setattr(vs, "stamp_blocks", refuse)
    facts, outs = _export_and_run(deep["qwen2_5_vl"], "qwen2_5_vl", tmp_path / "out", _params("stamp"))
    assert facts["blocks"].startswith("trace (stamping refused: block 3 reads")
    assert outs[0].shape[0] > 0


def test_stamping_refuses_a_template_that_is_not_the_one_traced(deep: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from stages.lib.checkpoints import local as ck
    from stages.lib.export.vision import _dynamo, images_at
    from stages.lib.hostside import vision as hv
    from stages.lib.patches import vision as pv

    visual = ck.load_vision(deep["qwen2_5_vl"], "qwen2_5_vl", torch.float32)
    spec = hv.VisionSpec.from_config("qwen2_5_vl", visual.config, None)
    pvals, grid = images_at([[56, 56]], spec, None, 0)
    feeds = hv.vision_inputs(spec, pvals, grid)
    args = tuple(torch.from_numpy(feeds[n]) for n in hv.input_names(spec))
    with pv.patch_vision_attention("qwen2_5_vl"), torch.no_grad():
        prog = _dynamo(pv.export_module(visual, "qwen2_5_vl", [0, 7, 11]), args, hv.input_names(spec),
                       pv.output_names("qwen2_5_vl"), 18, spec.merge_size**2)
    kinds = pv.block_kinds(visual, "qwen2_5_vl")
    with pytest.raises(StageError, match=r"has blocks \[0, 7, 11\], expected \[0, 5, 7, 11\]"):
        vs.stamp_blocks(prog.model, kinds, [0, 5, 7, 11], lambda n: visual.get_parameter(n.removeprefix("visual.")))
