from pipeline.stage import Stage, StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    (ctx.out / "source.txt").write_text(f"seed={ctx.params['seed']}\n")
    return StageResult(metrics={"seed": ctx.params["seed"]})


STAGE = Stage(name="source", version="1", run=run, params=lambda cfg, t: {"seed": cfg.model.seed},
              outputs=("source.txt",))
