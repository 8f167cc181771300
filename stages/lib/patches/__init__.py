"""Export-time patches of transformers internals, one module per graph (vision, text).

Import the submodule you need (``stages.lib.patches.vision``); nothing heavy is imported here.
"""
from stages.lib.patches import text as text  # noqa: E402  (decoder export patches; light: no torch at import)
