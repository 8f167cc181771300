import os
import time

from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    src = (ctx.inputs["source"] / "source.txt").read_text()
    ctx.report("writing half", 0.5)
    (ctx.out / "part1.txt").write_text(src)
    # Tests that kill a build mid-stage set this: the stage has written part of its outputs.
    time.sleep(float(os.environ.get("FAKE_MIDDLE_SLEEP", "0")))
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "part2.txt").write_text(f"samples={ctx.params['samples']}\n")
    return StageResult(metrics={"samples": ctx.params["samples"]})


STAGE = Stage(name="middle", version="1", run=run, deps=("source",),
              params=lambda cfg, t: {"samples": cfg.calibration.samples}, outputs=("part1.txt", "sub"))
