"""The light device runtime: check and run a vlmforge package with no torch and no transformers.

Installs with ``pip install 'vlmforge[runtime]'`` plus a backend (onnxruntime, TensorRT-RTX or
TensorRT); every backend's bindings are imported only when that backend is opened.

    from stages.lib.runtime import check_package, opened, choose, open_backend, open_pipeline
    res = check_package("package.tar")             # digests, device compatibility, probe gates
    with opened("package.tar") as pkg:              # extracted safely into a temp folder
        backend = open_backend(pkg, choose(pkg, None))   # the best this device has
        pipe = open_pipeline(pkg, backend)          # OrtPipeline over the backend's sessions

Modules: ``archive`` (safe extraction), ``package`` (manifest, digests), ``compat`` (device vs
package), ``backends`` (onnxruntime / tensorrt_rtx / tensorrt), ``check``, ``prompt`` (chat
template, tokenizer, image), ``generate`` (streaming greedy/sampled loop), ``cli``.
"""

from stages.lib.runtime.archive import extract
from stages.lib.runtime.backends import Backend, GraphSession, open_backend, open_pipeline
from stages.lib.runtime.check import CheckResult, GraphResult, check_package, choose
from stages.lib.runtime.compat import BACKENDS, Compatibility, DeviceInfo, best_backend, probe_device
from stages.lib.runtime.compat import check as check_compat
from stages.lib.runtime.errors import IncompatibleError, PackageError, RuntimeFailure, UsageError
from stages.lib.runtime.generate import Generation, Sampling, Stats, TextStream, generate
from stages.lib.runtime.package import (
    FORMAT_VERSION,
    FileCheck,
    Manifest,
    Package,
    load,
    opened,
    verify_files,
)
from stages.lib.runtime.prompt import ChatAssets, build_prompt, load_assets

__all__ = [
    "BACKENDS", "FORMAT_VERSION",
    "Backend", "ChatAssets", "CheckResult", "Compatibility", "DeviceInfo", "FileCheck", "Generation",
    "GraphResult", "GraphSession", "IncompatibleError", "Manifest", "Package", "PackageError", "RuntimeFailure",
    "Sampling", "Stats", "TextStream", "UsageError",
    "best_backend", "build_prompt", "check_compat", "check_package", "choose", "extract", "generate",
    "load", "load_assets", "open_backend", "open_pipeline", "opened", "probe_device", "verify_files",
]
