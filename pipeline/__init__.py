"""vlmforge's build graph: config, graph, cache, runner, CLI. Imports no heavy toolchain."""

__version__ = "0.1.0"
