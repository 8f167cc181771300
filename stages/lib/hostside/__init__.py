"""Host-side helpers shared by a deployment runtime and the verifier (numpy; no torch needed).

``vision``: image preprocessing and the vision graph's precomputed inputs; ``text``: M-RoPE
position ids, image-feature merge, prefill and decode-step feeds for the decoder graph;
``prompt_ids``: multimodal prompt assembly; ``generate``: greedy generation over the graphs
(onnxruntime imported when a pipeline is opened).
"""
