"""Streaming generation over a package: vision -> embed -> decoder with the KV cache, any backend.

The pieces are ``OrtPipeline``'s (``prefill``, ``step``, its embed graph) and the host helpers
of ``hostside.text``: the same code the build's parity ran, so greedy tokens here equal
``OrtPipeline.generate`` on the same graphs. Added here: the stop at an EOS token, sampling
(temperature, top-k, top-p, seeded), a callback per token, and the timings a deployment wants
(time to first token, decode tokens per second).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.hostside import text as host
from stages.lib.hostside.generate import OrtPipeline, Prompt

if TYPE_CHECKING:
    from stages.lib.runtime.backends import Backend
    from stages.lib.runtime.package import Package


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0 (the default); else softmax sampling, seeded."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first new token out (vision + prefill + first pick)
    decode_s: float = 0.0  # the tokens after the first
    stopped: str = "length"  # "length" | "eos"

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass
class Generation:
    tokens: list[int]
    stats: Stats
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Picker:
    def __init__(self, sampling: Sampling):
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.greedy:
            return int(np.argmax(logits))  # argmax in the graph's dtype, like OrtPipeline.generate
        z = np.asarray(logits, dtype=np.float64) / self.s.temperature
        if self.s.top_k and self.s.top_k < z.size:
            kth = np.partition(z, -self.s.top_k)[-self.s.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.s.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.s.top_p  # the smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def generate(pipe: OrtPipeline, prompt: Prompt, max_new_tokens: int = 64, sampling: Sampling | None = None,
             eos_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
    """Batch-1 generation: up to ``max_new_tokens``, stopping after an EOS id (pass none to never stop)."""
    if np.asarray(prompt.input_ids).shape[0] != 1:
        raise ValueError("the runtime generates for one prompt at a time (batch 1)")
    pick, eos = Picker(sampling or Sampling()), set(int(e) for e in eos_ids)
    mask = prompt.mask()
    stats = Stats(prompt_tokens=int(np.asarray(prompt.input_ids).shape[1]))
    t0 = time.perf_counter()
    logits, past, deltas = pipe.prefill(prompt)
    tokens: list[int] = []
    t1 = t0
    while True:
        nxt = pick(logits[0, -1])
        tokens.append(nxt)
        if len(tokens) == 1:
            t1 = time.perf_counter()
            stats.ttft_s = t1 - t0
        if on_token is not None:
            on_token(nxt)
        if nxt in eos:
            stats.stopped = "eos"
            break
        if len(tokens) >= max_new_tokens:
            break
        mask = host.extend_attention_mask(mask, 1)
        emb = pipe.embed.run(None, {"input_ids": np.asarray([[nxt]], dtype=np.int64)})[0]
        logits, past = pipe.step(emb, mask, host.decode_position_ids(mask, deltas, 1), past)
    stats.new_tokens = len(tokens)
    stats.decode_s = time.perf_counter() - t1
    return Generation(tokens, stats)


class TextStream:
    """Decoded text as tokens come: prints only what is new, holding back a partial UTF-8 piece."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character cut between tokens: wait for the rest
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def text(self) -> str:
        return self.decode(self.ids)


def run_package(pkg: Package, backend: Backend, images: list[Path], text: str, *, system: str | None = None,
                max_new_tokens: int = 128, sampling: Sampling | None = None, stop_at_eos: bool = True,
                write: Callable[[str], Any] | None = None) -> Generation:
    """Prompt assembly + generation on an opened package: what ``vlmforge generate`` runs.

    ``write`` receives the decoded text as it streams; the result carries the tokens, the
    whole text, the timings and the prompt (``extra["prompt"]``).
    """
    from stages.lib.runtime.backends import open_pipeline
    from stages.lib.runtime.prompt import build_prompt, load_assets

    assets = load_assets(pkg.tokenizer_dir, pkg.runtime.get("generation"), pkg.runtime.get("stop_token_ids"))
    engines = backend.name != "onnxruntime"  # engines have profiles; onnxruntime graphs take any shape
    vprof = pkg.io_spec("vision").get("profile") or {}
    max_patches = (vprof.get("patches") or {}).get("max") if engines else None
    prompt = build_prompt(assets, pkg.text_spec(), pkg.vision_spec(), images, text, system, max_patches)
    notes: list[str] = []
    if engines:
        max_new_tokens = _fit_profile(pkg.io_spec("decoder").get("profile") or {}, prompt, max_new_tokens, notes)
    pipe = open_pipeline(pkg, backend)
    stream = TextStream(assets.decode, write) if write is not None else None
    gen = generate(pipe, prompt, max_new_tokens, sampling, assets.eos_ids if stop_at_eos else (), stream)
    gen.text = assets.decode(gen.tokens)
    gen.extra = {"prompt": prompt, "template": assets.template_source, "notes": notes}
    return gen


def _fit_profile(profile: dict[str, Any], prompt: Prompt, max_new_tokens: int, notes: list[str]) -> int:
    """The decoder engine's profile bounds one call's tokens (``seq``) and the KV cache (``past``):
    a prompt over ``seq.max`` is refused; new tokens are capped where the cache would overflow
    (token k > 1 is decoded with a past of prompt + k - 2 tokens)."""
    from stages.lib.runtime.errors import UsageError

    n = int(np.asarray(prompt.input_ids).shape[1])
    seq_max = (profile.get("seq") or {}).get("max")
    past_max = (profile.get("past") or {}).get("max")
    if seq_max is not None and n > int(seq_max):
        raise UsageError(f"the prompt has {n} tokens; the decoder engine takes at most {seq_max} in one call "
                         f"(its profile: profiles.decoder.seq)")
    if past_max is not None and max_new_tokens > int(past_max) - n + 2:
        cap = max(1, int(past_max) - n + 2)
        notes.append(f"max new tokens capped at {cap}: the decoder engine's KV cache holds {past_max} tokens")
        return cap
    return max_new_tokens
