"""The device package format, version 1: every name a reader of ``package.tar`` relies on.

The package stage writes ``package.tar`` (an uncompressed tar: engines do not compress) and
``manifest.json`` (the same bytes as the tar's copy). The tar holds one top folder
``<name>-<target>/`` (``top_folder``) and, inside it::

    manifest.json           what the package is (MANIFEST_KEYS), sha256 + size of every other file
    runtime.json            what a host needs without transformers (RUNTIME_KEYS)
    engines/<g>.engine      TensorRT / TensorRT-RTX engines, with <g>.engine.json sidecars and
    engines/<g>.engine.json <g>.layers.json layer reports, for g in GRAPHS that were built
    engines/<g>.layers.json
    onnx/<g>.onnx           the quantized graphs (+ <g>.onnx.data) and their io specs <g>.json,
    onnx/<g>.json           so that OrtPipeline.from_folder(pkg/"onnx", pkg/"onnx") works;
                            optional (package.onnx: false), always there for weight-stripped
                            engines (they are refitted from these weights)
    tokenizer/...           the checkpoint's tokenizer, chat template, processor and
                            generation config files, unchanged
    probe/probe.npz         the held-out probe set: the reference stage's reference.npz unchanged
    probe/probe.json        what the arrays are and the gates each graph was built under

Tar members: sorted by path, directories listed (mode 0755), files mode 0644, mtime 0,
uid/gid 0 and no user/group names, no links, no absolute or ``..`` paths: the same inputs give
the same bytes, hence the same sha256.
"""

from __future__ import annotations

FORMAT_VERSION = 1

# the stage's outputs (relative to its output folder)
TAR_NAME = "package.tar"
MANIFEST = "manifest.json"

# inside the top folder
RUNTIME = "runtime.json"
ENGINES_DIR = "engines"
ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
PROBE_DIR = "probe"
PROBE_NPZ = f"{PROBE_DIR}/probe.npz"
PROBE_JSON = f"{PROBE_DIR}/probe.json"

GRAPHS = ("vision", "embed", "decoder")  # in the order a host runs them
REQUIRED_GRAPHS = ("vision",)  # vision-only models (CNN, bring-your-own ONNX) have no decoder
ENGINE_SUFFIXES = (".engine", ".engine.json", ".layers.json")  # engines/<g><suffix>
ONNX_SUFFIXES = (".onnx", ".onnx.data", ".json")  # onnx/<g><suffix>, where the quantize folder has them
GENERATION_CONFIG = "generation_config.json"  # a "model"-role file the package also ships

# tar member modes
FILE_MODE = 0o644
DIR_MODE = 0o755

MANIFEST_KEYS = ("format", "name", "family", "config_digest", "target", "compat", "precision", "graphs",
                 "onnx", "files", "parity", "notes", "created_by")
TARGET_KEYS = ("name", "sm", "builder", "builder_version")
COMPAT_KEYS = ("hardware_compatible", "version_compatible", "weight_stripped")
RUNTIME_KEYS = ("format", "family", "graphs", "text", "rope", "vision", "preprocess", "generation", "special_tokens",
                "added_tokens", "stop_token_ids")

# the reference's arrays (s{i}.<key>) that are model outputs; every other key is an input
PROBE_OUTPUTS = ("vision_features", "logits", "generated", "generated_margin")
PROBE_OUTPUT_PREFIXES = ("deepstack.",)


def top_folder(name: str, target: str) -> str:
    """The tar's single top folder, ``<config name>-<target>``."""
    return f"{name}-{target}"


def engine_files(graph: str) -> tuple[str, ...]:
    return tuple(f"{ENGINES_DIR}/{graph}{s}" for s in ENGINE_SUFFIXES)


def is_probe_output(key: str) -> bool:
    """Whether a probe array name (without its ``s{i}.`` prefix) is a reference output."""
    return key in PROBE_OUTPUTS or key.startswith(PROBE_OUTPUT_PREFIXES)
