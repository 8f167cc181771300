"""Issue 12: checkpoints the tool has never seen, of all three families, build with default
settings for rtx3090 (INT8) and rtx4090 (FP8): every gate met, generation gated, and the report
says what stayed high precision.

The checkpoints are not the embedded tiny model: odd widths (hidden 96, MLP 200, 6 heads / 2 KV
heads, a 1000-token vocabulary), Qwen2.5-VL stored in BF16 over several safetensors shards,
Qwen3-VL with the released three deepstack layers; random weights (no hub), saved with
``save_pretrained`` and given to the build as a local folder, as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli

TARGETS = {"rtx3090": "int8", "rtx4090": "fp8"}


def unseen_checkpoint(family: str, out: Path, seed: int = 7) -> Path:
    import torch

    from stages.lib.checkpoints.local import model_class
    from stages.lib.checkpoints.tiny import tiny_config, tiny_image_processor, tiny_tokenizer

    cfg = tiny_config(family, vocab_size=1000)
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 96, 200, 6, 2
    if family == "qwen3_vl":
        t.head_dim = 16
    if family == "qwen2_vl":
        v.embed_dim, v.num_heads, v.hidden_size = 48, 3, 96
    else:
        v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size = 48, 136, 3, 96
    torch.manual_seed(seed)
    model = model_class(family)._from_config(cfg, dtype=torch.float32).eval()
    bf16 = family == "qwen2_5_vl"  # released Qwen2.5-VL checkpoints: BF16, sharded
    if bf16:
        model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="150KB" if bf16 else "2GB")
    tiny_tokenizer(t.vocab_size).save_pretrained(out)
    tiny_image_processor(family, v.spatial_merge_size, v.patch_size).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_unseen_checkpoint_builds_with_default_gates(tmp_path: Path, family: str) -> None:
    import stages

    ckpt = unseen_checkpoint(family, tmp_path / "ckpt")
    if family == "qwen2_5_vl":
        assert len(list(ckpt.glob("*.safetensors"))) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    cfg = cli.config(f"name: unseen\nmodel:\n  checkpoint: {ckpt}\ntargets: [{', '.join(TARGETS)}]\n"
                     "precision:\n  vision: best\n  decoder: best\n", name="unseen.yaml")
    r = cli("build", str(cfg), "--until", "verify", "--json", check=None, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "artifacts" / "out" / "unseen"
    for target, prec in TARGETS.items():
        v = json.loads((out / f"verify@{target}" / "verify.json").read_text())
        rows = {(r["graph"], r["runtime"]): r for r in v["rows"]}
        assert v["passed"] is True
        gen, eff = rows[("generation", "onnxruntime")], rows[("vision_effect", "pytorch decoder")]
        # generation and the vision graph's effect on it are gated, not just measured
        assert gen["status"] == "pass" and any(g["name"].endswith(".tokens") for g in gen["gates"]), gen
        assert eff["status"] == "pass" and {g["name"].rsplit(".", 1)[1] for g in eff["gates"]} >= {"top1", "kl"}
        q = json.loads((out / f"quantize@{target}" / "quantize.json").read_text())
        for graph in ("vision", "decoder"):
            assert q[graph]["precision"] == prec
            assert 0 < q[graph]["weights"]["share"] <= 1.0  # what stayed in low precision, reported
            assert q[graph]["search_objective"]["top1"] is not None
    run = tmp_path / "artifacts" / "runs" / "unseen" / "latest"
    html, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert "Layers kept in high precision" in html and "vision_effect" in html  # the tables
    assert "decoder.weights_share" in md and "vision_effect.int8.pytorch decoder.top1" in md
