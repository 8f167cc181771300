"""Domain packages the stage modules are thin over (a stage never imports another stage; these
never import a stage):

- ``checkpoints``: local Hugging Face checkpoints (files, the one loader, generated ones, streaming);
- ``export``: vision, decoder and CNN exports to ONNX (block stamping, lazy weights);
- ``fusion``: graph rewrites and the fusible partitions they tag;
- ``qdq``: calibration, Q/DQ placement (reads the fusion partitions), insertion, sensitivity;
- ``trt``: TensorRT backends, engine builder, profiles, timing caches, layer report;
- ``parity``: figures and gates, graph/engine/export comparisons, drill-down;
- ``segments``: running big graphs block by block;
- ``hostside`` and ``runtime``: numpy host code and the device runtime shipped in packages;
- ``packaging``: the deployable archive; ``patches``: export-time model patches;
- ``dtypes``, ``ortsession``, ``reference_io``: the dtype tables, the ORT session factory, the
  reference-set format.
"""
