"""The held-out evaluation set and its PyTorch reference outputs, computed once and cached.

Every comparison downstream (ONNX, Q/DQ graphs, engines) reads the *inputs* from this artifact
too, so all of them see exactly the tensors PyTorch saw. The set is never the calibration set:
its seed and image sizes must differ from ``calibration`` (checked here, not assumed), otherwise
a quantized graph would be graded on the data its scales were fitted to.

``reference.npz`` (no pickle; ``np.load(..., allow_pickle=False)``), per sample ``i``:
  s{i}.image [H,W,3] u8, s{i}.pixel_values, s{i}.image_grid_thw [1,3], s{i}.input_ids [1,S],
  s{i}.attention_mask [1,S], s{i}.mm_token_type_ids [1,S], s{i}.position_ids [3,1,S],
  s{i}.rope_deltas [1,1], s{i}.inputs_embeds [1,S,H] (text embeddings with the *reference*
  image features merged in: the decoder's isolated input), s{i}.vision_features [N,H],
  s{i}.deepstack.{k} [N,H] (Qwen3-VL), s{i}.logits [1,S,V] (prefill), s{i}.generated [T] (greedy),
  s{i}.generated_margin [T, 2] (each step's lead: top-1 minus top-2 logit and probability;
  which generated tokens are decisive, parity.metrics.decisive).
``reference.json``: the set's description (sizes, prompts, token ids, counts).
Vision-only checkpoints (a CNN classifier) store image, pixel_values [1,3,H,W] (normalised as
``vision.json`` says), vision_features [1,C] (pooled) and logits [1,classes].
A bring-your-own ONNX (``model.vision_onnx`` alone) stores the same keys: pixel_values is the
image preprocessed as declared, vision_features the graph's first output and logits its
``logits`` output if it has one, all from the FP32 graph itself in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.stage import Stage, StageContext, StageError, StageResult
from stages.lib.checkpoints.reads import ALL_ROLES, checkpoint_reads
from stages.lib.heldout_data import check_held_out, held_out_images, held_out_prompts, held_out_source
from stages.lib.reference_io import META, NPZ, save_reference
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec



def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    v, c = cfg.verify, cfg.calibration
    return {
        "samples": v.samples,
        "image_sizes": [list(s) for s in v.image_sizes],
        "prompt_len": v.prompt_len,
        "generate_tokens": v.generate_tokens,
        "seed": v.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
        # model.vision_onnx alone: the reference is that FP32 ONNX in onnxruntime, fed as declared
        "vision_onnx": None if (src := _byo_source(cfg)) is None else {**src.preprocess(cfg.profiles.vision),
                                                                       "path": str(src.path)},
        # real held-out data (verify.images / verify.prompts): their content keys the stage (_external)
        "images": str(v.images) if v.images else None, "prompts": str(v.prompts) if v.prompts else None,
        # read only to prove the held-out set is disjoint from the calibration set
        "calibration": {"seed": c.seed, "image_sizes": [list(s) for s in c.image_sizes], "source": c.source},
    }


def _byo_source(cfg: BuildConfig) -> Any:
    """The bring-your-own vision ONNX when it *is* the model (no checkpoint, nothing generated)."""
    m = cfg.model
    return m.vision_onnx if m.checkpoint is None and m.generate is None else None


def _external(cfg: BuildConfig) -> list[Path]:
    """The BYO ONNX (and its external data) and the held-out folder's images and prompts: their
    content, not their paths, keys the reference."""
    from stages.lib.qdq.calibset import IMAGE_SUFFIXES

    src, v = _byo_source(cfg), cfg.verify
    out: list[Path] = []
    if src is not None:
        data = src.path.with_name(src.path.name + ".data")
        out += [src.path, *([data] if data.is_file() else [])]
    if v.images is not None:
        try:
            out += sorted(p for p in v.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError:  # the stage raises the one-line error when it runs
            pass
    return out + ([v.prompts] if v.prompts is not None and v.prompts.is_file() else [])








def _prompt_ids(tok: Any, n: int, rng: np.random.Generator, text: str | None = None) -> tuple[str, list[int]]:
    """``n`` text token ids of ``text`` (None: a deterministic sentence), repeated if the
    tokenizer makes fewer."""
    from stages.lib.hostside.prompt_ids import text_ids

    words = ["describe", "the", "image", "colors", "shape", "left", "right", "top", "bottom", "red",
             "blue", "green", "square", "light", "dark", "what", "is", "in", "a", "picture"]
    text = text if text is not None else " ".join(rng.choice(words, size=n))
    try:
        return text, text_ids(tok, text, n)
    except ValueError:
        raise StageError("the checkpoint's tokenizer produced no tokens for the evaluation prompt") from None


def _sample(model: Any, proc: Any, tok: Any, vspec: Any, p: dict[str, Any], image: np.ndarray,
            rng: np.random.Generator, text: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import torch
    from PIL import Image

    from stages.lib.hostside.prompt_ids import image_prompt_ids
    from stages.lib.hostside.vision import num_image_tokens

    cfg = model.config
    h, w = image.shape[:2]
    enc = proc(images=[Image.fromarray(image)], return_tensors="np")
    pixel_values, grid = np.asarray(enc["pixel_values"], np.float32), np.asarray(enc["image_grid_thw"], np.int64)
    n_img = sum(num_image_tokens(vspec, grid))
    text, ids = _prompt_ids(tok, int(p["prompt_len"]), rng, text)
    k = len(ids) // 3  # text on both sides of the image: the M-RoPE offsets after it matter
    input_ids = image_prompt_ids(ids[:k], ids[k:], n_img, cfg)
    t_ids = torch.tensor([input_ids], dtype=torch.long)
    mask = torch.ones_like(t_ids)
    types = (t_ids == cfg.image_token_id).to(torch.int32)
    t_pix, t_grid = torch.from_numpy(pixel_values), torch.from_numpy(grid)
    inputs = {"input_ids": t_ids, "attention_mask": mask, "pixel_values": t_pix, "image_grid_thw": t_grid,
              "mm_token_type_ids": types}
    with torch.no_grad():
        vis = model.model.get_image_features(t_pix, t_grid, return_dict=True)
        feats = torch.cat(list(vis.pooler_output), 0)
        pos, deltas = model.model.get_rope_index(t_ids, types, image_grid_thw=t_grid, attention_mask=mask)
        embeds = model.model.get_input_embeddings()(t_ids)
        embeds = embeds.masked_scatter((t_ids == cfg.image_token_id)[..., None].expand_as(embeds), feats)
        logits = model(**inputs).logits
        # EOS must not end the reference early: every one of the N tokens is compared
        gen = model.generate(**inputs, max_new_tokens=int(p["generate_tokens"]), do_sample=False,
                             eos_token_id=None, pad_token_id=int(cfg.text_config.pad_token_id or 0),
                             output_logits=True, return_dict_in_generate=True)
    from stages.lib.parity.metrics import margins

    # each greedy step's leads (top-1 minus top-2 logit, probability): the token gates count a position only
    # where it exceeds the unquantized export's noise (parity.metrics.decisive)
    step_logits = np.stack([lg[0].float().numpy() for lg in gen.logits])
    arrays = {
        "image": image, "pixel_values": pixel_values, "image_grid_thw": grid,
        "input_ids": t_ids.numpy(), "attention_mask": mask.numpy(), "mm_token_type_ids": types.numpy(),
        "position_ids": pos.numpy().astype(np.int64), "rope_deltas": deltas.numpy().astype(np.int64),
        "inputs_embeds": embeds.float().numpy(), "vision_features": feats.float().numpy(),
        "logits": logits.float().numpy(), "generated": gen.sequences[0, t_ids.shape[1]:].numpy().astype(np.int64),
        "generated_margin": margins(step_logits).astype(np.float32),
    }
    for j, ds in enumerate(getattr(vis, "deepstack_features", None) or []):
        arrays[f"deepstack.{j}"] = torch.cat(list(ds), 0).float().numpy()
    meta = {"image_size": [h, w], "prompt": text, "seq_len": len(input_ids), "image_tokens": n_img,
            "grid_thw": grid.tolist()}
    return arrays, meta


def _cnn_sample(model: Any, proc: Any, image: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Vision-only checkpoints (a CNN classifier): the image normalised the way ``vision.json``
    tells a runtime to (mean/std, NCHW, no resize: the graph is dynamic in H and W), the pooled
    features and the logits."""
    import torch

    h, w = image.shape[:2]
    mean = np.asarray(getattr(proc, "image_mean", None) or IMAGENET_MEAN, np.float32)
    std = np.asarray(getattr(proc, "image_std", None) or IMAGENET_STD, np.float32)
    x = ((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None].copy()
    backbone = getattr(model, "resnet", None) or getattr(model, "convnext", None) or model
    with torch.no_grad():
        feats = backbone(pixel_values=torch.from_numpy(x)).pooler_output.flatten(1)
        head = getattr(model, "classifier", None)
        arrays = {"image": image, "pixel_values": x, "vision_features": feats.float().numpy()}
        if head is not None and backbone is not model:
            arrays["logits"] = head(feats).float().numpy()
    return arrays, {"image_size": [h, w], "prompt": None, "seq_len": 0, "image_tokens": 1, "grid_thw": None}


def _byo_run(ctx: StageContext) -> StageResult:
    """Bring-your-own ONNX: there is no PyTorch model, so the FP32 graph itself in onnxruntime
    (optimizations off, as quantize/verify run theirs) is the reference. Images go through
    calibrate's ``ImageFeeder``, the one implementation of the declared resize/normalise/layout,
    so every stage feeds the graph the same tensor. Arrays as for a CNN checkpoint."""
    from stages.lib.parity.noise_floor import FLOOR_FIGURES, floor_of, perturbed
    from stages.lib.qdq.calibset import ImageFeeder, Sample
    from stages.lib.qdq.graphio import session
    from stages.lib.qdq.heldout import run_all

    p = ctx.params
    src = p["vision_onnx"]
    feeder = ImageFeeder({"preprocess": src})
    samples: list[dict[str, np.ndarray]] = []
    metas = []
    names = [o.name for o in session(Path(src["path"])).get_outputs()]
    images = held_out_images(p, resize=False)  # the graph's own preprocessing resizes, once
    for i, (name, image, _) in enumerate(images):
        ctx.report(f"reference sample {i + 1}/{len(images)} (onnxruntime fp32)", i / len(images))
        h, w = image.shape[:2]
        feed = feeder.vision(Sample(name, image, ""))[0]
        noisy_feed = {**feed, feeder.name: perturbed(feed[feeder.name], src["std"], src["layout"], i)}
        out, noisy = run_all(src["path"], [feed, noisy_feed], names)
        a = {"image": image, "pixel_values": feed[feeder.name], "vision_features": out[names[0]],
             # how far ±½ grey level moves the output: which gates this image can grade (noise_floor)
             "noise_floor": floor_of(noisy[names[0]], out[names[0]])}
        if "logits" in out:  # a classifier head: verify grades its top-1 too
            a["logits"] = out["logits"]
        samples.append(a)
        metas.append({"image": name, "image_size": [h, w], "prompt": None, "seq_len": 0, "image_tokens": 1,
                      "grid_thw": None, "noise_floor": dict(zip(FLOOR_FIGURES, map(float, a["noise_floor"]), strict=True))})
    meta = {"family": "byo", "held_out": held_out_source(p), "vision_only": True, "samples": metas, "dtype": "fp32",
            "reference": f"onnxruntime fp32 {Path(src['path']).name}", "outputs": names,
            "preprocess": {k: v for k, v in src.items() if k != "path"}}
    save_reference(ctx.out, samples, meta)
    return StageResult(metrics={"samples": len(metas), "image_sizes": [m["image_size"] for m in metas],
                                "reference": "onnxruntime fp32", "held_out": held_out_source(p)},
                       notes=[f"bring-your-own ONNX: the reference is {Path(src['path']).name} itself in onnxruntime"])





def _run(ctx: StageContext) -> StageResult:
    import torch

    from stages.lib.checkpoints.local import (
        VISION_ONLY_FAMILIES,
        load_image_processor,
        load_model,
        load_processor,
        resolve_checkpoint,
    )
    from stages.lib.checkpoints.streamed_model import load_streamed

    p = ctx.params
    check_held_out(p)
    if p["vision_onnx"] is not None:
        return _byo_run(ctx)
    path, family = resolve_checkpoint(ctx.inputs["checkpoint"])
    torch.manual_seed(int(p["seed"]))
    vision_only = family in VISION_ONLY_FAMILIES
    # a VLM's FP32 reference streams its blocks from the shards (an 8 B model in FP32 is 35 GB)
    load = load_model if vision_only else load_streamed
    model = load(path, dtype="fp32", trust_remote_code=bool(p["trust_remote_code"]))
    vspec = None
    if vision_only:
        proc, tok = load_image_processor(path, bool(p["trust_remote_code"])), None
    else:
        from stages.lib.hostside.vision import VisionSpec

        proc, tok = load_processor(path, bool(p["trust_remote_code"]))
        vspec = VisionSpec.from_config(family, model.config.vision_config)  # merge size: image tokens
    samples: list[dict[str, np.ndarray]] = []
    metas = []
    images, texts = held_out_images(p), held_out_prompts(p)
    for i, (name, image, rng) in enumerate(images):
        ctx.report(f"reference sample {i + 1}/{len(images)}", i / len(images))
        text = texts[i % len(texts)] if texts else None
        a, m = _cnn_sample(model, proc, image) if vision_only else _sample(model, proc, tok, vspec, p, image, rng, text)
        samples.append(a)
        metas.append({"image": name, **m})
    c = model.config
    meta: dict[str, Any] = {"family": family, "vision_only": vision_only, "samples": metas, "dtype": "fp32",
                            "held_out": held_out_source(p)}
    metrics: dict[str, Any] = {"samples": len(metas), "image_sizes": [m["image_size"] for m in metas],
                               "held_out": held_out_source(p)}
    if not vision_only:
        meta |= {"generate_tokens": int(p["generate_tokens"]), "image_token_id": int(c.image_token_id),
                 "vocab_size": int(c.text_config.vocab_size), "eos_token_id": c.text_config.eos_token_id}
        metrics |= {"seq_lens": [m["seq_len"] for m in metas],
                    "generated_distinct_tokens": [len(set(s["generated"].tolist())) for s in samples]}
    save_reference(ctx.out, samples, meta)
    return StageResult(metrics=metrics)


STAGE = Stage(
    name="reference",
    resources=node_resources("reference"),
    # 5: the greedy steps' margins (generated_margin); 4: VLM reference streamed block by block;
    # 6: real held-out data (verify.images / verify.prompts), each sample's image named
    # 7: a BYO sample carries its noise floor (parity.noise_floor)
    version="7",
    run=_run,
    params=_params,
    deps=("checkpoint",),
    outputs=(NPZ, META),
    toolchain=("torch", "transformers", "numpy", "onnxruntime", "pillow"),
    external=checkpoint_reads(*ALL_ROLES, plus=_external),
    description="held-out evaluation set and cached PyTorch (or BYO ONNX fp32) reference outputs",
)
