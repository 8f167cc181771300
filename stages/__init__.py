"""Stage modules, one per stage. Each defines ``STAGE`` (see ``pipeline.stage.Stage``).

Listed by name so that reading the declarations imports no heavy toolchain: a stage module
keeps torch/onnx/tensorrt imports inside its functions.

    checkpoint -> export_vision, export_decoder -> fuse -> calibrate -> quantize@T -> engine@T
    checkpoint -> reference ------------------------------------------^ (held-out set) -> verify@T
"""

STAGE_MODULES: tuple[str, ...] = (
    "stages.checkpoint",
    "stages.export_vision",
    "stages.export_decoder",
    "stages.fuse",
    "stages.calibrate",
    "stages.reference",
    "stages.quantize",
    "stages.engine",
    "stages.verify",
    "stages.package",
)

# Subcommands the stage layer adds to `vlmforge` (each module has ``register(subparsers)``).
COMMAND_MODULES: tuple[str, ...] = ("stages.lib.packaging.cli", "stages.lib.runtime.cli")
