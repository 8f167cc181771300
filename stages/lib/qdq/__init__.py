"""Explicit quantization for TensorRT: placement rules, calibration, Q/DQ insertion, mixed precision.

Modules, one job each: `rules` (the placement tables per mode, as data), `patterns` (graph
matchers the rules use), `placement` (apply the rules to a graph: where Q/DQ goes and why not),
`calibrators` (streaming ranges from onnxruntime), `nonfinite` (the layer that made a NaN/Inf),
`calibset` (calibration images/prompts to graph feeds), `insert` (int8/fp8 Q/DQ), `int4`
(block-wise weight-only DQ), `awq` (INT4 scale search folded into norms), `streamed_weights`
(weights read and written a chunk of rows at a time), `recipe` (plan + insert), `sensitivity`
(automatic fallback), `block_scores` (a group scored at its own block), `heldout` (held-out feeds and parity), `graphio` (load/save/check/run),
`model_tensors` (every tensor a model holds and its bytes: the 2 GB proto limit).
"""
