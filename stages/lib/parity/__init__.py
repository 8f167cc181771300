"""Parity: figures and gates (metrics), the decoder/engine/graph comparisons and the block-by-block drill-down."""
