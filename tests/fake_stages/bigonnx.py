"""Writes an ONNX graph whose weights live in external data (size from the config), as the
export stages do for real models, so cache tests see the > 256 MiB path without an ML model."""

import numpy as np

from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    import onnx_ir as ir

    n = int(ctx.params["mib"]) * (1 << 20) // 4
    w = ir.tensor(np.arange(n, dtype=np.float32) % 251, name="w")
    x = ir.Value(name="x", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=w)
    add = ir.node("Add", inputs=[x, wv], outputs=[ir.Value(name="y")])
    graph = ir.Graph([x], add.outputs, nodes=[add], initializers=[wv], opset_imports={"": 19}, name="big")
    ir.save(ir.Model(graph, ir_version=10), ctx.out / "big.onnx", external_data="big.onnx.data")
    return StageResult(metrics={"bytes": n * 4})


STAGE = Stage(name="bigonnx", version="1", run=run, params=lambda cfg, t: {"mib": cfg.calibration.samples},
              outputs=("big.onnx", "big.onnx.data"))
