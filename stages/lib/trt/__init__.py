"""TensorRT engines: the backend (TensorRT-RTX or full TensorRT), the builder, profiles, timing caches and the per-layer report."""
