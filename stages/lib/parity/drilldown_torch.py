"""The PyTorch side of the verify stage's drill-down: which module outputs to capture, per graph.

``stages.lib.parity.drilldown`` finds each block's output in the ONNX graph and compares it with
captured PyTorch outputs; which modules those are depends on the model: a CNN backbone's stages,
a ViT's patch embedding and blocks (Qwen2.5-VL's window reordering of patches tried both ways),
or the decoder's layers fed the reference's merged embeddings and deepstack maps. That knowledge
of the model's structure is kept here, out of the stage's gating and reporting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageContext


def drilldown_graph(ctx: StageContext, graph: str, path: Path, specs: Any, sample: dict[str, np.ndarray],
                    model: Any) -> dict[str, Any]:
    """The drill-down of one graph on one sample against ``model``: per-block figures, the first
    jump, and the plot ``drilldown_<graph>.png`` in the stage's output folder."""
    import torch

    from stages.lib.parity import drilldown as dd
    from stages.lib.parity.feeds import decoder_feeds, vision_feeds

    if graph == "vision" and specs.vision is None:  # CNN: one point per stage of the backbone
        backbone = getattr(model, "resnet", None) or getattr(model, "convnext", None) or model
        x = torch.from_numpy(sample["pixel_values"])
        got = dd.capture_torch([(st, "out") for st in backbone.encoder.stages], lambda: backbone(pixel_values=x))
        res = dd.drilldown(path, vision_feeds(specs, sample), "stages", got)
    elif graph == "vision":
        visual = model.model.visual
        blocks = list(visual.blocks)
        pv, grid = torch.from_numpy(sample["pixel_values"]), torch.from_numpy(sample["image_grid_thw"])
        points = [(visual.patch_embed, "out"), (blocks[0], "in"), *[(b, "out") for b in blocks]]
        got = dd.capture_torch(points, lambda: model.model.get_image_features(pv, grid))
        # Qwen2.5-VL reorders patches into attention windows before the blocks; the exported
        # graph may keep processor order. Both orders are candidates; block 0 decides.
        perm = dd.row_order(got[0], got[1])
        orders = [None] if perm is None or (perm == np.arange(len(perm))).all() else [None, np.argsort(perm)]
        res = dd.drilldown(path, vision_feeds(specs, sample), "blocks", got[2:], orders)
    else:
        lm = model.model.language_model
        kw = {"inputs_embeds": torch.from_numpy(sample["inputs_embeds"]),
              "attention_mask": torch.from_numpy(sample["attention_mask"]),
              "position_ids": torch.from_numpy(sample["position_ids"]), "use_cache": False}
        deep = [torch.from_numpy(sample[f"deepstack.{k}"]) for k in range(specs.text.deepstack_layers)]
        if deep:
            ids = torch.from_numpy(sample["input_ids"])
            kw |= {"visual_pos_masks": ids == specs.text.image_token_id, "deepstack_visual_embeds": deep}
        got = dd.capture_torch([(b, "out") for b in lm.layers], lambda: lm(**kw))
        res = dd.drilldown(path, decoder_feeds(path, specs, sample), "layers", got)
    if res["blocks"]:
        png = ctx.out / f"drilldown_{graph}.png"
        dd.plot(res["blocks"], f"{graph} ({ctx.params['target']}): error per block vs PyTorch", png,
                res["jump"].get("block"))
        res["plot"] = png.name
    return res
