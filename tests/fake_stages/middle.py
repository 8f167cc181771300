import os
import time

from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    src = (ctx.inputs["source"] / "source.txt").read_text()
    ctx.report("writing half", 0.5)
    (ctx.out / "part1.txt").write_text(src)
    # Tests that kill a build mid-stage set this: the stage has written part of its outputs.
    time.sleep(float(os.environ.get("FAKE_MIDDLE_SLEEP", "0")))
    # The farm test kills the first try's worker mid-stage: only the first try sleeps (the
    # marker file says a try has started), so the retry the executor makes finishes at once.
    once = os.environ.get("VLMFORGE_FAKE_SLEEP_ONCE")
    if once and not os.path.exists(once):
        open(once, "w").close()
        time.sleep(60)
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "part2.txt").write_text(f"samples={ctx.params['samples']}\n")
    return StageResult(metrics={"samples": ctx.params["samples"]})


STAGE = Stage(name="middle", version="1", run=run, deps=("source",),
              params=lambda cfg, t: {"samples": cfg.calibration.samples}, outputs=("part1.txt", "sub"))
