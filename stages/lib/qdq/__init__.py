"""Explicit quantization for TensorRT: placement rules, calibration, Q/DQ insertion, mixed precision.

Modules: `rules` (tables per mode), `placement` (apply the rules to a graph), `patterns` (matchers), `calibrators`
(streaming ranges from onnxruntime), `insert` (int8/fp8 Q/DQ), `int4` (weight-only blocks),
`recipe` (plan + insert), `sensitivity` (automatic fallback), `graphio`, `calibset`.
"""
