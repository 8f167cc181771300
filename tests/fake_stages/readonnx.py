"""Reads bigonnx's graph and its external data from the cache with onnx-ir and onnx, as the
fuse and calibrate stages read the exports."""

from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    import onnx
    import onnx_ir as ir

    path = ctx.inputs["bigonnx"] / "big.onnx"
    model = ir.load(path)
    total = float(model.graph.initializers["w"].const_value.numpy().sum())
    proto = onnx.load(str(path), load_external_data=True)
    (ctx.out / "sum.txt").write_text(f"{total} {len(proto.graph.initializer[0].raw_data)} opset={ctx.params['opset']}\n")
    return StageResult(metrics={"sum": total})


STAGE = Stage(name="readonnx", version="1", run=run, deps=("bigonnx",),
              params=lambda cfg, t: {"opset": cfg.export.opset}, outputs=("sum.txt",))
