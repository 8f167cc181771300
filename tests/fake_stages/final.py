from pipeline.resources import NodeResources
from pipeline.stage import GateCheck, ReportTable, Stage, StageContext, StageError, StageResult
from stages.lib.sizing import gpu_resource

SECTION = "Fake figures"


def run(ctx: StageContext) -> StageResult:
    assert ctx.target is not None
    if ctx.target["builder"] == "tensorrt":
        raise StageError(f"{ctx.target['name']}: full TensorRT is not installed on this machine")
    body = (ctx.inputs["middle"] / "part1.txt").read_text() + f"target={ctx.target['name']}\n"
    (ctx.out / "final.bin").write_text(body)
    g = GateCheck.check("fake.cosine", ctx.params["cos"], 0.99)
    table = ReportTable(SECTION, ("target", "cosine"), ((ctx.target["name"], g.value),), status=("pass",) if g.passed else ("fail",))
    return StageResult(metrics={"bytes": len(body)}, gates=[g], report=[table])


STAGE = Stage(name="final", version="1", run=run, deps=("middle",), per_target=True,
              params=lambda cfg, t: {"ws": cfg.engine.workspace_mb, "cos": cfg.gates["int8"].cosine + 0.001},
              outputs=("final.bin",), deliver=("final.bin",), report_sections=((SECTION, "No final node ran."),),
              resources=lambda cfg, t: NodeResources(custom=gpu_resource(t)))  # a full-TensorRT target: its GPU
