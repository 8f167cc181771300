"""Export-time patches of transformers internals, one module per graph (vision, text).

Import the submodule you need (``stages.lib.patches.vision``); nothing heavy is imported here.
"""
