"""OrtPipeline (embed + host merge + decoder, KV cache) against PyTorch on a tiny Qwen2-VL.

The graphs here are exported with the TorchScript path of ``export_decoder_graph`` (about 1 s
instead of ~15 s for dynamo on a loaded box): this file tests the runtime, not the exporter;
``tests/test_export_decoder.py`` runs the stage's own (dynamo) export through the same pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stages.lib.hostside import text as host
from stages.lib.hostside.generate import OrtPipeline, Prompt, token_agreement, torch_generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, OrtPipeline, Any]:
    from stages.lib.checkpoints.local import load_model, load_processor
    from stages.lib.checkpoints.tiny import generate_tiny
    from stages.lib.export import decoder as dx

    root = tmp_path_factory.mktemp("gen")
    path = generate_tiny("qwen2_vl", root / "model", seed=0)
    model = load_model(path, dtype="fp32")
    spec = host.TextSpec.from_config("qwen2_vl", model.config)
    dx.export_decoder_graph(model, "qwen2_vl", 0, root / "decoder.onnx", "fp32", 19,
                            {"batch": 2, "seq": 6, "past": 3}, exporter="torchscript")
    dx.export_embed_graph(dx.embed_table(model), root / "embed.onnx", 19)
    image_processor, _ = load_processor(path)
    return model, OrtPipeline(root / "decoder.onnx", root / "embed.onnx", spec), image_processor


def _prompt(model: Any, image_processor: Any) -> Prompt:
    from stages.lib.parity.decoder import make_prompt

    return make_prompt(model, image_processor, [(112, 168), (196, 140)], prompt_len=12, seed=3)


def test_multimodal_generation_matches_model_generate(setup: tuple[Any, OrtPipeline, Any]) -> None:
    from stages.lib.parity.decoder import torch_visual_features

    model, pipe, proc = setup
    prompt = _prompt(model, proc)
    assert (prompt.attention_mask == 0).any()  # left padding is exercised
    ref = torch_generate(model, prompt, 12)
    prompt.image_features, prompt.deepstack_features = torch_visual_features(model, prompt)
    tokens = pipe.generate(prompt, 12)
    assert tokens.shape == (2, 12)
    np.testing.assert_array_equal(tokens, ref)
    assert len(np.unique(tokens)) > 4


def test_teacher_forced_prefill_picks_the_greedy_tokens(setup: tuple[Any, OrtPipeline, Any]) -> None:
    """The prompt and its first n - 1 greedy tokens in one pass (left-padded batch): the argmax at
    the n positions from the prompt's last one are the n tokens the decode loop picked."""
    from stages.lib.parity.decoder import torch_visual_features

    model, pipe, proc = setup
    prompt = _prompt(model, proc)
    prompt.image_features, prompt.deepstack_features = torch_visual_features(model, prompt)
    tokens, steps = pipe.generate(prompt, 6, return_logits=True)
    feeds, deltas = pipe.prefill_feeds(prompt, tokens[:, :-1])
    s = prompt.input_ids.shape[1]
    assert feeds["inputs_embeds"].shape[1] == s + 5 and deltas.shape == (2, 1)
    logits = pipe.decoder.run(None, feeds)[0][:, s - 1:]
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), tokens)
    np.testing.assert_allclose(logits, steps, rtol=1e-4, atol=1e-4)


def test_text_only_generation_matches(setup: tuple[Any, OrtPipeline, Any]) -> None:
    model, pipe, _ = setup
    ids = np.random.default_rng(5).integers(0, 400, size=(1, 9))
    prompt = Prompt(ids)
    assert token_agreement(pipe.generate(prompt, 10), torch_generate(model, prompt, 10)) == 1.0


def test_image_features_change_the_output(setup: tuple[Any, OrtPipeline, Any]) -> None:
    """The merge is real: other visual features give other logits at the image positions."""
    from stages.lib.parity.decoder import torch_visual_features

    model, pipe, proc = setup
    prompt = _prompt(model, proc)
    feats, _ = torch_visual_features(model, prompt)
    prompt.image_features = feats
    a, _ = pipe.prompt_embeds(prompt)
    prompt.image_features = feats * 0.5
    b, _ = pipe.prompt_embeds(prompt)
    img = prompt.input_ids == pipe.spec.image_token_id
    assert not np.allclose(a[img], b[img]) and np.array_equal(a[~img], b[~img])


def test_chunked_prefill_equals_one_prefill(setup: tuple[Any, OrtPipeline, Any]) -> None:
    """past > 0 with seq > 1 (chunked prefill) gives the logits of a single prefill."""
    _, pipe, _ = setup
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 400, size=(2, 11))
    emb = pipe.embed.run(None, {"input_ids": ids})[0]
    pos = np.broadcast_to(np.arange(11), (3, 2, 11)).copy()
    full, _ = pipe.step(emb, np.ones((2, 11), np.int64), pos, pipe.empty_past(2))
    first, past = pipe.step(emb[:, :4], np.ones((2, 4), np.int64), pos[:, :, :4], pipe.empty_past(2))
    second, _ = pipe.step(emb[:, 4:], np.ones((2, 11), np.int64), pos[:, :, 4:], past)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, rtol=1e-4, atol=1e-4)


def test_missing_vision_graph_is_a_clear_error(setup: tuple[Any, OrtPipeline, Any]) -> None:
    model, pipe, proc = setup
    with pytest.raises(ValueError, match="no vision graph"):
        pipe.generate(_prompt(model, proc), 2)


def test_runtime_needs_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys, stages.lib.hostside.generate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
