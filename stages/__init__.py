"""Stage modules, one per stage. Each defines ``STAGE`` (see ``pipeline.stage.Stage``).

Listed by name so that reading the declarations imports no heavy toolchain: a stage module
keeps torch/onnx/tensorrt imports inside its functions.
"""

STAGE_MODULES: tuple[str, ...] = (
    "stages.checkpoint",
)
