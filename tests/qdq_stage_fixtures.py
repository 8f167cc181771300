"""Stand-in upstream folders for the calibrate/quantize stage tests.

A real tiny checkpoint (its processor and tokenizer drive the feeds), plus small fused-graph
stand-ins with the exporters' I/O names: `vision.onnx` (pixel_values [N, patch_dim] →
image_features [N/merge², H]), `decoder.onnx` (inputs_embeds, attention_mask, position_ids,
past_key_values.0.* → logits) and `embed.onnx` (Gather). The real exported graphs are used by
the slow end-to-end tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H, V, KV, HD = 64, 512, 2, 16


def checkpoint(root: Path, family: str = "qwen2_5_vl") -> Path:
    from stages.lib.checkpoints.tiny import generate_tiny

    folder = root / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    generate_tiny(family, folder / "model", seed=0)
    (folder / "checkpoint.json").write_text(json.dumps({"path": "model", "family": family}))
    return folder


def _w(rng: np.random.Generator, shape: tuple[int, ...], name: str, dt: type, scale: float) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(dt), name)


def fuse_folder(root: Path, patch_dim: int, dtype: type = np.float16, nan_at: str | None = None) -> Path:
    """Write vision/decoder/embed stand-ins. `nan_at="decoder"` makes the decoder emit NaN."""
    rng = np.random.default_rng(0)
    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    folder = root / "fuse"
    folder.mkdir(parents=True, exist_ok=True)
    vis = helper.make_graph(
        [
            helper.make_node("Reshape", ["pixel_values", "merge"], ["m"], name="visual/merger/reshape"),
            helper.make_node("MatMul", ["m", "w_fc1"], ["f1"], name="/visual/merger/mlp.0/MatMul"),
            helper.make_node("Relu", ["f1"], ["g1"], name="/visual/merger/act"),
            helper.make_node("MatMul", ["g1", "w_fc2"], ["image_features"], name="/visual/merger/mlp.2/MatMul"),
        ],
        "vision",
        [helper.make_tensor_value_info("pixel_values", t, ["patches", patch_dim])],
        [helper.make_tensor_value_info("image_features", t, ["tokens", H])],
        [numpy_helper.from_array(np.array([-1, 4 * patch_dim], np.int64), "merge"),
         _w(rng, (4 * patch_dim, 128), "w_fc1", dtype, 0.03), _w(rng, (128, H), "w_fc2", dtype, 0.1)],
    )
    dec_nodes = [
        helper.make_node("LayerNormalization", ["inputs_embeds", "ln_g", "ln_b"], ["h"], name="/model/layers.0/ln"),
        helper.make_node("MatMul", ["h", "w_up"], ["u"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Relu", ["u"], ["r"], name="/model/layers.0/mlp/act"),
        helper.make_node("MatMul", ["r", "w_down"], ["d"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Add", ["d", "inputs_embeds"], ["x1"], name="/model/layers.0/residual"),
        helper.make_node("MatMul", ["x1", "w_head"], ["l0"], name="/lm_head/MatMul"),
    ]
    if nan_at == "decoder":
        dec_nodes[-1] = helper.make_node("MatMul", ["x1", "w_head"], ["l1"], name="/lm_head/MatMul")
        dec_nodes.append(helper.make_node("Log", ["l1"], ["l0"], name="/bad/log"))  # log(<0) = NaN
    dec_nodes.append(helper.make_node("Identity", ["l0"], ["logits"], name="/logits"))
    dec = helper.make_graph(
        dec_nodes,
        "decoder",
        [
            helper.make_tensor_value_info("inputs_embeds", t, ["batch", "seq", H]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [3, "batch", "seq"]),
            helper.make_tensor_value_info("past_key_values.0.key", t, ["batch", KV, "past", HD]),
            helper.make_tensor_value_info("past_key_values.0.value", t, ["batch", KV, "past", HD]),
        ],
        [helper.make_tensor_value_info("logits", t, ["batch", "seq", V])],
        [numpy_helper.from_array(np.ones(H, dtype), "ln_g"), numpy_helper.from_array(np.zeros(H, dtype), "ln_b"),
         _w(rng, (H, 128), "w_up", dtype, 0.15), _w(rng, (128, H), "w_down", dtype, 0.1),
         _w(rng, (H, V), "w_head", dtype, 0.15)],
    )
    emb = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", t, ["batch", "seq", H])],
        [_w(rng, (V, H), "embed_tokens.weight", dtype, 1.0)],
    )
    for name, g in (("vision", vis), ("decoder", dec), ("embed", emb)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
        m.ir_version = 10
        onnx.checker.check_model(m)
        onnx.save(m, str(folder / f"{name}.onnx"))
    (folder / "vision.json").write_text(json.dumps({"dtype": "fp16" if dtype == np.float16 else "fp32"}))
    return folder


def reference_folder(root: Path, ckpt: Path, fuse: Path, sizes=((112, 168), (196, 140)), seed: int = 4321) -> Path:
    """A held-out set in the reference stage's format (inputs only: no PyTorch outputs here)."""
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq.calibset import Feeder, Sample
    from stages.lib.qdq.graphio import session

    path, family = resolve_checkpoint(ckpt)
    f = Feeder(path, family, 24, session(fuse / "embed.onnx"))
    arrays, metas = {}, []
    from stages.lib.qdq.calibset import synthetic_image

    for i, (h, w) in enumerate(sizes):
        rng = np.random.default_rng([seed, i])
        s = Sample(f"held-{i}", synthetic_image(h, w, rng), "what is in the picture left right")
        vfeed, grid = f.vision(s)
        n_img = int(grid.prod()) // 4
        feats = rng.standard_normal((n_img, H)).astype(np.float32)
        dfeed = f.decoder(s, grid, {"image_features": feats}, [])
        arrays.update({f"s{i}.pixel_values": vfeed["pixel_values"], f"s{i}.image_grid_thw": grid,
                       f"s{i}.inputs_embeds": dfeed["inputs_embeds"].astype(np.float32),
                       f"s{i}.attention_mask": dfeed["attention_mask"], f"s{i}.position_ids": dfeed["position_ids"]})
        c = f.config
        pid = f.prompt_ids(s.text)
        k = len(pid) // 3
        ids = np.asarray([pid[:k] + [c.vision_start_token_id] + [c.image_token_id] * n_img + [c.vision_end_token_id]
                          + pid[k:]], np.int64)
        arrays[f"s{i}.input_ids"] = ids
        metas.append({"image_size": [h, w]})
    folder = root / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "reference.npz", **arrays)
    (folder / "reference.json").write_text(json.dumps({"family": family, "samples": metas}))
    return folder


def run_stage(work: Path, cfg: Any, name: str, target: Any = None) -> Any:
    """Run the real stage ``name`` in ``work/<node>`` on its deps' folders beside it (no cache,
    no runner): how the stage tests chain checkpoint -> ... -> quantize by hand."""
    import importlib
    import shutil

    from pipeline.stage import StageContext

    st = importlib.import_module(f"stages.{name}").STAGE
    out = work / (f"{name}@{target.name}" if target else name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = StageContext(name, st.params(cfg, target), {d: work / d for d in st.deps}, out,
                       target.model_dump() if target else None, st.external(cfg) if st.external else [])
    return st.run(ctx)
