"""A big FP16 graph with external data, written tile by tile, for the external-data tests
(tests/test_big_graphs_fuse.py, tests/test_big_graphs_graphio.py): ``BigGraph`` and its reference
output, ``assert_whole`` (a saved graph loads, checks and runs from its own folder alone) and the
real sizes of the issue (``V_REAL``, ``H_REAL``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from stages.lib.qdq import graphio

FUSE_PARAMS = {"fold_batchnorm": True, "attention": "auto", "cleanup": True, "opset": 19}
TILE_E, TILE_W = 1024, 64  # rows of the repeated random tiles the weights are written from
IDS = np.array([[0, 1, 2, 3, 1029]], np.int64)


class BigGraph:
    """``input_ids`` -> Gather(embed [V, H]) -> Mul(0.5 + 0.5, folded by cleanup) -> MatMul(lm_head
    [H, V]) -> Add(bias [V], inline) -> ``logits``, FP16. The two weights are written to
    ``<name>.data`` tile by tile (one tile in memory, never the whole table); the reference output
    is computed from the tiles."""

    def __init__(self, folder: Path, vocab: int, hidden: int, name: str = "decoder.onnx", seed: int = 0):
        self.path = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        self.te = min(TILE_E, vocab)
        self.tw = min(TILE_W, hidden)
        assert hidden % self.tw == 0
        self.tile_e = rng.uniform(-1, 1, (self.te, hidden)).astype(np.float16)
        self.tile_w = rng.uniform(-0.02, 0.02, (self.tw, vocab)).astype(np.float16)
        self.bias = rng.uniform(-0.1, 0.1, vocab).astype(np.float16)
        data = name + ".data"
        inits, offset = [], 0
        with open(folder / data, "wb") as f:
            for wname, shape, tile in (("embed", (vocab, hidden), self.tile_e), ("lm_head", (hidden, vocab), self.tile_w)):
                length = shape[0] * shape[1] * 2
                written = 0
                while written < length:
                    chunk = tile[: (length - written) // (tile.shape[1] * 2)]
                    f.write(chunk.tobytes())
                    written += chunk.nbytes
                inits.append(_external(wname, shape, data, offset, length))
                offset += length
                pad = -offset % 65536  # 64 KiB-aligned, as exporters lay out large tensors
                f.write(b"\0" * pad)
                offset += pad
        inits.append(numpy_helper.from_array(self.bias, "bias"))
        half = helper.make_tensor("half", TensorProto.FLOAT16, [], [0.5])
        nodes = [
            helper.make_node("Gather", ["embed", "input_ids"], ["h"], axis=0, name="/embed/Gather"),
            helper.make_node("Constant", [], ["c0"], value=half, name="/c0"),
            helper.make_node("Constant", [], ["c1"], value=half, name="/c1"),
            helper.make_node("Add", ["c0", "c1"], ["one"], name="/one"),
            helper.make_node("Mul", ["h", "one"], ["h1"], name="/scale"),
            helper.make_node("MatMul", ["h1", "lm_head"], ["mm"], name="/lm_head/MatMul"),
            helper.make_node("Add", ["mm", "bias"], ["logits"], name="/lm_head/Add"),
        ]
        g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
        m.ir_version = 10
        onnx.save_model(m, str(self.path))  # the proto itself is small: the weights are already in the file

    def reference(self, ids: np.ndarray) -> np.ndarray:
        h = self.tile_e[ids % self.te].astype(np.float32)  # embed row r is tile_e[r % te]
        # lm_head row k is tile_w[k % tw]: h @ lm_head = (h folded onto tw rows) @ tile_w
        folded = h.reshape(*h.shape[:-1], -1, self.tw).sum(-2)
        return folded @ self.tile_w.astype(np.float32) + self.bias.astype(np.float32)


def _external(name: str, shape: tuple[int, int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(shape), data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def assert_whole(path: Path, external: bool, big: BigGraph | None = None) -> None:
    """``path`` loads from its own folder alone (onnx-ir, onnx with its data, onnx.checker by path,
    an ORT session running one inference); external data, when expected, lies beside it."""
    folder = path.parent
    bare = onnx.load(str(path), load_external_data=False)
    ext = [t for t in bare.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        assert ext, "expected the weights in external data"
        for t in ext:
            info = {e.key: e.value for e in t.external_data}
            data = folder / info["location"]
            assert info["location"] == path.name + ".data" and data.is_file(), info
            assert int(info.get("offset", 0)) + int(info["length"]) <= data.stat().st_size
    else:
        assert not ext, f"inline graph still points at external data: {[t.name for t in ext]}"
    del bare
    onnx.checker.check_model(str(path), full_check=True)
    model = ir.load(path)
    for v in model.graph.initializers.values():
        assert v.const_value is not None
        arr = v.const_value.numpy()
        assert arr.size == 0 or np.isfinite(arr.reshape(-1)[:16].astype(np.float32)).all()
    del model, arr
    full = onnx.load(str(path), load_external_data=True)
    assert all(t.data_location != TensorProto.EXTERNAL for t in full.graph.initializer)
    del full
    sess = graphio.session(path)
    (logits,) = sess.run(None, {"input_ids": IDS})
    del sess
    if big is not None:
        ref = big.reference(IDS)
        assert logits.shape == ref.shape
        np.testing.assert_allclose(logits.astype(np.float32), ref, atol=2e-2 * max(1.0, float(np.abs(ref).max())))


def _move_away(folder: Path, to: Path) -> Path:
    """Rename a written folder, so a graph still pointing at its old location fails to load."""
    shutil.move(str(folder), str(to))
    return to


# the real sizes of the issue, for the slow tests (2.49 GB of FP16 weights)
V_REAL, H_REAL = 151936, 4096
