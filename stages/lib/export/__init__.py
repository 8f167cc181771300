"""Exporters: the vision tower, the language decoder and CNN towers to ONNX (traced once per block kind, the rest stamped), with their export parity."""
