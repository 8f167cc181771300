"""The stamped decoder export (trace K layers, clone the last per layer, bind weights lazily)
against the whole-decoder trace, on tiny checkpoints deeper than the template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.stage import StageError

SAMPLE = {"batch": 2, "seq": 4, "past": 3}
# (family, text layers, deepstack maps): the template is max(2, deepstack + 2) layers deep
DEEP = {"qwen2_5_vl": (4, 0), "qwen2_vl": (6, 0), "qwen3_vl": (7, 3)}


def _checkpoint(out: Path, family: str, layers: int, *, dtype: str = "fp32", tied: bool = False,
                layout: str = "hub") -> Path:
    """A random tiny checkpoint with ``layers`` text layers. ``layout``: ``hub`` (``model.layers.*``,
    ``visual.*``: what released checkpoints and save_pretrained write) or ``v5`` (transformers 5's
    module paths, ``model.language_model.*``)."""
    import torch

    from stages.lib.checkpoints.local import model_class
    from stages.lib.checkpoints.tiny import tiny_config
    from stages.lib.dtypes import torch_dtype

    d = tiny_config(family).to_dict()
    d["text_config"]["num_hidden_layers"] = layers
    d["text_config"].pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
    if tied:
        d["tie_word_embeddings"] = d["text_config"]["tie_word_embeddings"] = True
    cfg = type(tiny_config(family)).from_dict(d)
    torch.manual_seed(0)
    model = model_class(family)._from_config(cfg, dtype=torch.float32).eval().to(torch_dtype(dtype))
    model.save_pretrained(out, safe_serialization=True)
    if layout == "v5":
        from safetensors.torch import load_file, save_file

        state = load_file(out / "model.safetensors")
        v5 = ("model.language_model.", "model.visual.")  # Qwen3-VL's save_pretrained already writes these
        renamed = {("model." + k if k.startswith("visual.") else
                    k.replace("model.", "model.language_model.", 1) if k.startswith("model.") and not k.startswith(v5)
                    else k): v for k, v in state.items()}
        save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _export_both(ckpt: Path, out: Path, family: str, n_deep: int, dtype: str = "fp32") -> tuple[Path, Path, dict[str, Any]]:
    """(stamped decoder.onnx, traced decoder.onnx, stamped export facts), both finalised like the stage."""
    from stages.lib.export import decoder as dx
    from stages.lib.export import decoder_graph as dg
    from stages.lib.export.decoder_load import load_decoder
    from stages.lib.export.decoder_stamp import export_stamped

    (out / "stamp").mkdir(parents=True)
    (out / "trace").mkdir()
    stamped, traced = out / "stamp" / "decoder.onnx", out / "trace" / "decoder.onnx"
    facts = export_stamped(ckpt, family, n_deep, stamped, dtype, 19, SAMPLE)
    dg.finalize_graph(stamped, facts["layers"], n_deep)
    dx.export_decoder_graph(load_decoder(ckpt, dtype), family, n_deep, traced, dtype, 19, SAMPLE)
    dg.finalize_graph(traced, facts["layers"], n_deep)
    return stamped, traced, facts


def _assert_same_outputs(a: Path, b: Path, facts: dict[str, Any], n_deep: int, atol: float = 1e-5) -> None:
    """Both graphs' logits and every present, on a prefill (past 0) and a decode step (past 5)."""
    import onnxruntime as ort

    sa, sb = ort.InferenceSession(str(a)), ort.InferenceSession(str(b))
    dt = np.float16 if sa.get_inputs()[0].type == "tensor(float16)" else np.float32
    rng = np.random.default_rng(0)
    for past, seq in ((0, 5), (5, 1)):
        feeds = {"inputs_embeds": rng.standard_normal((2, seq, facts["hidden"])).astype(dt),
                 "attention_mask": np.ones((2, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq), (3, 2, seq)).copy()}
        for i in range(facts["layers"]):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal(
                    (2, facts["kv_heads"], past, facts["head_dim"])).astype(dt)
        for k in range(n_deep):
            feeds[f"deepstack_embeds.{k}"] = rng.standard_normal((2, seq, facts["hidden"])).astype(dt)
        names = [o.name for o in sa.get_outputs()]
        for name, x, y in zip(names, sa.run(None, feeds), sb.run(names, feeds), strict=True):
            assert x.shape == y.shape, name
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=0, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """family -> (stamped, traced, facts), exported on first use (the fast tests need one family)."""
    cache: dict[str, tuple[Path, Path, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Path, Path, dict[str, Any]]:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"stamp_{family}")
            layers, n_deep = DEEP[family]
            ckpt = _checkpoint(root / "ckpt", family, layers, layout="v5" if family == "qwen3_vl" else "hub")
            cache[family] = _export_both(ckpt, root, family, n_deep)
        return cache[family]

    return get


@pytest.mark.parametrize("family", [
    "qwen2_5_vl",
    pytest.param("qwen2_vl", marks=pytest.mark.slow),
    pytest.param("qwen3_vl", marks=pytest.mark.slow),  # 3 deepstack maps: a 5-layer template
])
def test_stamped_equals_traced(family: str, exported: Any) -> None:
    from stages.lib.export import decoder_graph as dg

    stamped, traced, facts = exported(family)
    layers, n_deep = DEEP[family]
    assert facts["layers"] == layers and facts["template_layers"] == max(2, n_deep + 2) < layers
    assert dg.io_spec(stamped) == dg.io_spec(traced)  # names, dtypes, dims (batch/seq/past/total)
    _assert_same_outputs(stamped, traced, facts, n_deep)


@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_cut_list_and_layer_metadata(family: str, exported: Any) -> None:
    import onnx
    import onnx_ir as ir

    from stages.lib.segments.cuts import cuts_from_name_scopes, layer_of, read_cuts

    stamped, traced, facts = exported(family)
    n = facts["layers"]
    for path in (stamped, traced):  # both export paths record one cut per layer
        model = ir.load(str(path))
        cuts = read_cuts(model)
        assert len(cuts) == n and len(set(cuts)) == n
        produced = {o.name: layer_of(node) for node in model.graph for o in node.outputs}
        assert [produced[c] for c in cuts] == list(range(n))  # each cut leaves its own layer
        assert {layer_of(node) for node in model.graph} >= set(range(n))
        assert cuts_from_name_scopes(model) == cuts  # the stamped nodes' scopes say the same
    g = onnx.load(str(stamped), load_external_data=False).graph
    last = n - 1  # a stamped layer: module-path node names and per-layer weights like a traced one
    assert f"/text_model/layers.{last}/self_attn/q_proj/MatMul" in {node.name for node in g.node}
    inits = {t.name for t in g.initializer}
    assert {f"text_model.layers.{last}.mlp.down_proj.weight_t", "lm_head.weight_t"} <= inits
    assert f"text_model.layers.{last}.input_layernorm.weight" in inits


def test_missing_layer_tensor_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from stages.lib.export.decoder_stamp import export_stamped

    ckpt = _checkpoint(tmp_path / "ckpt", "qwen2_5_vl", 4)
    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.3.mlp.up_proj.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StageError) as e:
        export_stamped(ckpt, "qwen2_5_vl", 0, tmp_path / "decoder.onnx", "fp32", 19, SAMPLE)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt / "model.safetensors") in msg
    assert "no tensor model.layers.3.mlp.up_proj.weight" in msg and "layer 3" in msg  # as the checkpoint names it
    assert not (tmp_path / "decoder.onnx").exists()


@pytest.mark.slow
def test_bf16_hub_tied_checkpoint_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released-style checkpoint (BF16, ``model.*`` names, no lm_head: tied) exported to FP16 with
    every weight in the external data file: the same graph as the traced export."""
    import onnx

    from stages.lib.export import decoder as decoder_export

    monkeypatch.setattr(decoder_export, "EXTERNAL_DATA_BYTES", 0)
    ckpt = _checkpoint(tmp_path / "ckpt", "qwen2_5_vl", 4, dtype="bf16", tied=True)
    stamped, traced, facts = _export_both(ckpt, tmp_path, "qwen2_5_vl", 0, dtype="fp16")
    # all but the < 256-byte tensors (FP16 norms, biases), which ir.save keeps inline
    assert facts["external_data"] and (stamped.parent / "decoder.onnx.data").stat().st_size > 0.95 * facts["weight_bytes"]
    m = onnx.load(str(stamped), load_external_data=False)
    ext = {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {"lm_head.weight_t", "text_model.layers.3.self_attn.q_proj.weight_t"} <= ext
    _assert_same_outputs(stamped, traced, facts, 0, atol=0)  # FP16 weights rounded the same way


def test_embed_graph_from_the_checkpoint(tmp_path: Path) -> None:
    import onnxruntime as ort

    from stages.lib.export import decoder as dx
    from stages.lib.export.decoder_graph import io_spec
    from stages.lib.export.decoder_load import load_decoder
    from stages.lib.export.lazy_weights import export_embed_lazy

    ckpt = _checkpoint(tmp_path / "ckpt", "qwen2_vl", 2, dtype="bf16", layout="v5")
    export_embed_lazy(ckpt, "fp16", tmp_path / "lazy.onnx", 19)
    dx.export_embed_graph(dx.embed_table(load_decoder(ckpt, "fp16")), tmp_path / "ref.onnx", 19)
    assert io_spec(tmp_path / "lazy.onnx") == io_spec(tmp_path / "ref.onnx")
    ids = {"input_ids": np.array([[0, 5, 511], [3, 3, 7]], np.int64)}
    got, want = (ort.InferenceSession(str(tmp_path / f)).run(None, ids)[0] for f in ("lazy.onnx", "ref.onnx"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transpose", [False, True])
def test_lazy_tensor_streams_what_it_evaluates_to(transpose: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``tofile`` (what ir.save calls: blocks of rows) writes the bytes ``tobytes`` gives."""
    import io

    import torch

    from stages.lib.export import lazy_weights as lw
    from stages.lib.export.decoder_load import _PREFIXES, _canonical

    ckpt = _checkpoint(tmp_path / "ckpt", "qwen2_5_vl", 2, dtype="bf16")
    refs = lw.checkpoint_tensors(ckpt, _PREFIXES, _canonical)
    ref = refs["lm_head.weight"]
    monkeypatch.setattr(lw, "_BLOCK_BYTES", 1000)  # several blocks
    for name in ("lm_head.weight", "model.language_model.norm.weight"):
        tensor = lw.lazy_tensor(refs[name], torch.float16, transpose and name == "lm_head.weight", name)
        buf = io.BytesIO()
        tensor.tofile(buf)
        assert buf.getvalue() == tensor.tobytes() and len(buf.getvalue()) == tensor.nbytes
    want = lw.read_tensor(ref, torch.float32, transpose)
    assert want.shape == (tuple(reversed(ref.shape)) if transpose else ref.shape)


def test_layer_limited_load_reads_the_first_layers(tmp_path: Path) -> None:
    import torch

    from stages.lib.export.decoder_load import load_decoder, template_decoder
    from stages.lib.export.decoder_stamp import template_layers

    ckpt = _checkpoint(tmp_path / "ckpt", "qwen2_5_vl", 4, layout="v5")
    full, part = load_decoder(ckpt), load_decoder(ckpt, layers=2)
    assert len(part.model.language_model.layers) == 2 and part.config.text_config.num_hidden_layers == 2
    want = full.state_dict()
    for name, t in part.state_dict().items():
        assert torch.equal(t, want[name]), name
    tpl = template_decoder(ckpt, "fp16", 2, vocab=64)
    assert tpl.lm_head.weight.shape == (64, 64) and tpl.lm_head.weight.dtype == torch.float16
    assert [template_layers(n, d) for n, d in ((2, 0), (28, 0), (3, 3), (36, 3))] == [2, 2, 3, 5]


def test_mixed_layer_types_are_not_stamped() -> None:
    """A sliding-window Qwen2 config's later layers differ from the template's: the stage traces."""
    from types import SimpleNamespace

    from stages.lib.export.decoder_stamp import stamp_blocker

    full = SimpleNamespace(num_hidden_layers=6, layer_types=["full_attention"] * 6)
    assert stamp_blocker(full, 0) is None
    mixed = SimpleNamespace(num_hidden_layers=6, layer_types=["full_attention"] * 4 + ["sliding_attention"] * 2)
    assert "sliding_attention" in str(stamp_blocker(mixed, 0))
    # from the template's last layer (4 of a 3-deepstack model) on, what counts is that they are alike
    assert stamp_blocker(mixed, 3) is None
    late = SimpleNamespace(num_hidden_layers=6, layer_types=["full_attention"] * 5 + ["sliding_attention"])
    assert stamp_blocker(late, 3) is not None and stamp_blocker(SimpleNamespace(num_hidden_layers=4), 0) is None


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dtype"), [("qwen2_5_vl", "fp16"), ("qwen2_vl", "fp32"), ("qwen3_vl", "fp32")])
def test_stage_parity_on_a_stamped_decoder(family: str, dtype: str, tmp_path: Path) -> None:
    """The export_decoder stage on checkpoints deeper than the template: the parity gates pass."""
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext
    from stages.export_decoder import STAGE
    from stages.lib.checkpoints.tiny import generate_tiny

    layers, n_deep = DEEP[family][0] + 2, DEEP[family][1]
    folder = tmp_path / "ck"
    model_dir = generate_tiny(family, folder / "model", seed=0)  # tokenizer + processor
    for f in ("model.safetensors", "config.json"):
        (model_dir / f).unlink()
    _checkpoint(model_dir, family, layers)
    (folder / "checkpoint.json").write_text(json.dumps({"path": "model", "family": family}))
    cfg = BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": family},
                                      "targets": ["rtx4090"], "export": {"dtype": dtype}})
    out = tmp_path / "out"
    out.mkdir()
    res = STAGE.run(StageContext(node_id="export_decoder", params=STAGE.params(cfg, None),
                                 inputs={"checkpoint": folder}, out=out, target=None, external=[]))
    assert all(g.passed for g in res.gates), res.gates
    assert res.metrics["decoder_export"] == "stamp" and res.metrics["template_layers"] == max(2, n_deep + 2)
    assert res.metrics["top1"] == 1.0 if dtype == "fp32" else res.metrics["top1"] >= 0.99
    meta = json.loads((out / "decoder.json").read_text())
    assert f"past_key_values.{layers - 1}.value" in {i["name"] for i in meta["inputs"]}
