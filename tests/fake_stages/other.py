import os
import signal

from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    # Crash-isolation tests set this: the worker dies as the OOM killer would kill it.
    if os.environ.get("FAKE_OTHER_DIE"):
        os.kill(os.getpid(), signal.SIGKILL)
    (ctx.out / "other.txt").write_text((ctx.inputs["source"] / "source.txt").read_text() + "other\n")
    return StageResult()


STAGE = Stage(name="other", version="1", run=run, deps=("source",),
              params=lambda cfg, t: {"opset": cfg.export.opset}, outputs=("other.txt",))
