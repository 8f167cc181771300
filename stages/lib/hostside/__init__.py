"""Host-side helpers shared by a deployment runtime and the verifier (numpy; no torch needed).

``vision``: image preprocessing and the vision graph's precomputed inputs; ``text``: M-RoPE
position ids, image-feature merge and decode-step helpers for the decoder graph.
"""
