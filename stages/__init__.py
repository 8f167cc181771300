"""Stage modules, one per stage. Each defines ``STAGE`` (see ``pipeline.stage.Stage``).

Listed by name so that reading the declarations imports no heavy toolchain: a stage module
keeps torch/onnx/tensorrt imports inside its functions.

The graph (``@T``: one node per target; tests/test_imports.py checks it against the code):

    checkpoint
    export_vision  <- checkpoint
    export_decoder <- checkpoint, export_vision  (its parity generates through vision.onnx)
    fuse           <- export_vision, export_decoder
    calibrate      <- fuse, checkpoint
    reference      <- checkpoint  (held-out set and PyTorch outputs)
    quantize@T     <- fuse, calibrate, checkpoint, reference
    engine@T       <- quantize@T
    verify@T       <- reference, quantize@T, engine@T, checkpoint
    package@T      <- engine@T, quantize@T, checkpoint, reference, verify@T
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
