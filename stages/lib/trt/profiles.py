"""Optimization profiles (min/opt/max per dynamic input) from the config and a graph's io spec.

The io spec (`vision.json` / `decoder.json`, docs/CONTRACT.md) names every dynamic axis; the
config says the range in user terms (image sizes, batch, prompt and past length). Each axis
name maps to one (min, opt, max) triple here, so one table decides every input's profile and an
axis this module does not know is an error, never a guess.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage import StageError

Triple = tuple[int, int, int]
Shape = tuple[int, ...]


def _find(spec: Any, *keys: str) -> int | None:
    """First value of any of `keys` anywhere in the io spec (exporters nest the vision scalars)."""
    if isinstance(spec, dict):
        for k in keys:
            if isinstance(spec.get(k), int):
                return int(spec[k])
        for v in spec.values():
            if (found := _find(v, *keys)) is not None:
                return found
    return None


def _snap(side: int, factor: int) -> int:
    # Qwen's processor (smart_resize) rounds each side to the nearest multiple of patch*merge
    return max(factor, round(side / factor) * factor)


def vision_patch_counts(vision: dict[str, Any], patch: int, merge: int) -> Triple:
    """Patch rows N = images * (h/patch) * (w/patch) for the min, opt and max of `profiles.vision`.

    min and opt are one image of the min/opt size; max is `max_images` images of the max size
    (the graph takes all images' patches concatenated along N). Single images have one
    temporal patch (the processor repeats the frame), so t = 1.
    """
    factor = patch * merge

    def n(hw: Any, images: int) -> int:
        h, w = (_snap(int(s), factor) for s in hw)
        return images * (h // patch) * (w // patch)

    return n(vision["min_image"], 1), n(vision["opt_image"], 1), n(vision["max_image"], int(vision["max_images"]))


def _vision_axes(io_spec: dict[str, Any], vision: dict[str, Any]) -> dict[str, Triple]:
    imgs = (1, 1, int(vision["max_images"]))
    axes: dict[str, Triple] = {"images": imgs, "num_images": imgs, "batch": imgs}
    for i, key in enumerate(("height", "width")):  # CNN towers take the image itself
        axes[key] = tuple(int(vision[k][i]) for k in ("min_image", "opt_image", "max_image"))  # type: ignore[assignment]
    patch = _find(io_spec, "patch_size")
    merge = _find(io_spec, "merge_size", "spatial_merge_size")
    if patch is not None:
        counts = vision_patch_counts(vision, patch, merge or 1)
        for name in ("patches", "num_patches", "n_patches", "seq", "tokens"):
            axes[name] = counts
        m2 = (merge or 1) ** 2
        merged = tuple(c // m2 for c in counts)
        for name in ("merged", "merged_patches", "num_tokens", "image_tokens"):
            axes[name] = merged  # type: ignore[assignment]
    return axes


def _decoder_axes(decoder: dict[str, Any]) -> dict[str, Triple]:
    def t(k: str) -> Triple:
        d = decoder[k]
        return int(d["min"]), int(d["opt"]), int(d["max"])

    b, s, p = t("batch"), t("seq"), t("past")
    total = tuple(x + y for x, y in zip(s, p, strict=True))
    return {"batch": b, "seq": s, "sequence": s, "past": p, "past_seq": p, "past_len": p,
            "total": total, "total_seq": total, "kv_len": total}  # type: ignore[dict-item]


def _byo_dims(io_spec: dict[str, Any], inp: dict[str, Any], vision: dict[str, Any]) -> dict[int, Triple] | None:
    """A bring-your-own image input (``preprocess`` in the io spec) by position, whatever its
    axes are called (exporters name them freely, or not at all): dim 0 is the batch (1 ..
    max_images); H and W are the declared resize, since every image is resized to it, or with
    ``fit: keep-aspect`` profiles.vision's min/opt/max on the stride grid."""
    pre = io_spec.get("preprocess") or {}
    if not pre or inp["name"] != pre.get("input_name") or len(inp["shape"]) != 4:
        return None
    hw = (1, 2) if pre.get("layout") == "NHWC" else (2, 3)
    batch = (1, 1, int(vision["max_images"]))
    if pre.get("fit") == "keep-aspect":  # the sizes the feeder makes: profiles.vision on the stride grid
        st = int(pre.get("stride") or 32)
        lo, opt, hi = (vision[k] for k in ("min_image", "opt_image", "max_image"))

        def grid(i: int) -> Triple:
            a, c = -(-int(lo[i]) // st) * st, max(st, int(hi[i]) // st * st)
            return a, min(max(round(int(opt[i]) / st) * st, a), c), c

        return {0: batch, hw[0]: grid(0), hw[1]: grid(1)}
    h, w = (int(x) for x in pre["resize"])
    return {0: batch, hw[0]: (h, h, h), hw[1]: (w, w, w)}


def profile_for(graph: str, io_spec: dict[str, Any], profiles: dict[str, Any]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min shape, opt shape, max shape)} for every input with a named axis.

    `profiles` is `cfg.profiles.model_dump()`; the vision graph uses `profiles["vision"]`,
    the decoder (and embed) graph `profiles["decoder"]`.
    """
    if graph == "vision":
        axes = _vision_axes(io_spec, profiles["vision"])
    else:
        axes = _decoder_axes(profiles["decoder"])
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for inp in io_spec.get("inputs", []):
        shape = inp["shape"]
        if all(isinstance(d, int) and d >= 0 for d in shape):
            continue  # static: no profile entry needed
        byo = _byo_dims(io_spec, inp, profiles["vision"]) if graph == "vision" else None
        dims: list[Triple] = []
        for k, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                dims.append((d, d, d))
            elif byo is not None and k in byo:
                dims.append(byo[k])
            elif isinstance(d, str) and d in axes:
                dims.append(axes[d])
            else:
                known = ", ".join(sorted(axes))
                hint = "" if graph != "vision" or "patches" in axes else " (the io spec has no patch_size)"
                raise StageError(f"{graph}: input {inp['name']} axis {d!r} has no profile rule{hint}; known axes: {known}")
        lo, opt, hi = (tuple(x[i] for x in dims) for i in range(3))
        out[inp["name"]] = (lo, opt, hi)
    return out
