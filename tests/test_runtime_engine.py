"""The light device runtime's engine backends (stages/lib/runtime): device compatibility (SM,
builder and its version, hardware- and version-compatible engines), the one-line refusals, and
the engine session's IO binding.

The package is the FP16 package of the tiny default (tests/runtime_package.py), built once per
test session. No GPU here: the engine backends are checked for their refusals (one line each)
and, through a stand-in TensorRT module, for their IO binding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stages.lib.runtime import check_package, compat, opened
from stages.lib.runtime.errors import IncompatibleError, PackageError
from tests.runtime_package import PROMPT, cli

# --- device compatibility ---------------------------------------------------------------------


def _pkg_with_target(unpacked: Path, **target: str) -> Path:
    m = json.loads((unpacked / "manifest.json").read_text())
    m["target"] = {**m["target"], **target}
    (unpacked / "manifest.json").write_text(json.dumps(m))  # the manifest is not in its own file list
    return unpacked


@pytest.mark.parametrize(("device", "target", "needs"), [
    (compat.DeviceInfo(("9.0",), {"tensorrt-rtx": "1.7.1.116"}), {},
     "needs an NVIDIA GPU of SM 8.9 (its engines were built for rtx4090); this device has SM 9.0"),
    (compat.DeviceInfo(("8.9",), {"tensorrt-rtx": "1.8.0.20"}), {},
     "needs tensorrt-rtx 1.7.1.116 (exactly this version: its engines are tied to the builder); "
     "this device has tensorrt-rtx 1.8.0.20"),
    (compat.DeviceInfo(("8.9",), {"tensorrt-rtx": "1.7.1.116"}), {"sm": "12.0", "name": "rtx5090"},
     "needs an NVIDIA GPU of SM 12.0 (its engines were built for rtx5090); this device has SM 8.9"),
    (compat.DeviceInfo(("8.9",), {"tensorrt-rtx": "1.7.1.116"}), {"builder": "tensorrt", "builder_version": "10.13"},
     "the tensorrt_rtx backend runs tensorrt-rtx engines (use --backend tensorrt)"),
    (compat.DeviceInfo((), {"tensorrt-rtx": "1.7.1.116"}), {},
     "tensorrt_rtx backend needs an NVIDIA GPU with driver; none found"),
    (compat.DeviceInfo(("8.9",), {"tensorrt-rtx": None}, {"tensorrt-rtx": "tensorrt_rtx_bindings: ImportError"}), {},
     "tensorrt_rtx backend needs the tensorrt-rtx Python bindings"),
])
def test_another_sm_or_builder_is_refused_in_one_line(unpacked: Path, device: compat.DeviceInfo,
                                                      target: dict[str, str], needs: str) -> None:
    pkg_dir = _pkg_with_target(unpacked, **target)
    res = check_package(pkg_dir, "tensorrt_rtx", device=device)
    assert res.exit_code == 2 and needs in res.message and "\n" not in res.message, res.message
    assert res.graphs == []  # nothing ran
    with opened(pkg_dir) as pkg:  # the same device with the right SM and version: accepted (engines not run)
        ok = compat.check(pkg, "tensorrt_rtx", compat.DeviceInfo(("8.6", pkg.manifest.target.sm),
                                                                   {"tensorrt-rtx": pkg.manifest.target.builder_version}))
        assert ok.ok == (pkg.manifest.target.builder == "tensorrt-rtx") and (not ok.ok or ok.device_index == 1)


def test_hardware_and_version_compatible_engines_widen_what_runs(unpacked: Path) -> None:
    m = json.loads((unpacked / "manifest.json").read_text())
    m["compat"] = {"hardware_compatible": True, "version_compatible": True, "weight_stripped": False}
    (unpacked / "manifest.json").write_text(json.dumps(m))
    with opened(unpacked) as pkg:
        assert compat.check(pkg, "tensorrt_rtx", compat.DeviceInfo(("12.0",), {"tensorrt-rtx": "1.7.2.0"})).ok
        assert not compat.check(pkg, "tensorrt_rtx", compat.DeviceInfo(("7.5",), {"tensorrt-rtx": "1.7.1.116"})).ok
        assert not compat.check(pkg, "tensorrt_rtx", compat.DeviceInfo(("8.9",), {"tensorrt-rtx": "1.6.0.1"})).ok


def test_engine_backends_fail_with_one_clear_line_here(package: Path) -> None:
    r = cli("check", str(package), "--backend", "tensorrt_rtx")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["FAIL tensorrt_rtx backend needs an NVIDIA GPU with driver; none found "
                                             "(package rt-rtx4090 needs tensorrt-rtx 1.7.1.116 on an NVIDIA GPU of "
                                             "SM 8.9 (rtx4090))"]
    r = cli("generate", str(package), "--prompt", "hi", "--backend", "tensorrt")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "the tensorrt backend runs tensorrt engines (use --backend tensorrt_rtx)" in r.stderr
    from stages.lib.runtime.backends import tensorrt

    with pytest.raises(IncompatibleError, match="tensorrt backend needs TensorRT's Python bindings"):
        tensorrt.load_module()  # tensorrt-stubs is installed here: a namespace of .pyi files, no Runtime

# --- the engine path, with a stand-in TensorRT (no GPU here) -----------------------------------


class _FakeDriver:
    """Device memory as host byte arrays: what the engine session writes and reads back."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.stream_handle = 7

    def alloc(self, n: int) -> int:
        ptr = 0x1000 * (len(self.mem) + 1)
        self.mem[ptr] = bytearray(max(n, 256))
        return ptr

    def free(self, ptr: int) -> None:
        self.mem.pop(ptr, None)

    def upload(self, ptr: int, arr: np.ndarray) -> None:
        b = np.ascontiguousarray(arr).tobytes()
        self.mem[ptr][: len(b)] = b

    def download(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.mem[ptr][:n]), dtype=dtype).reshape(shape).copy()

    def synchronize(self) -> None:
        pass


def _fake_trt(driver: _FakeDriver) -> Any:
    """A TensorRT module stand-in: one engine computing y = 2 * x (fp32), z = x.sum(-1) (fp16)."""
    import types

    trt = types.SimpleNamespace()
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: dt

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = shape
            return len(shape) == 2 and shape[1] == 4

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            n = self.shapes["x"][0]
            return (n, 4) if name == "y" else (n,)

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addr[name] = ptr

        def execute_async_v3(self, stream: int) -> bool:
            assert stream == driver.stream_handle
            x = driver.download(self.addr["x"], self.shapes["x"], np.float32)
            driver.upload(self.addr["y"], 2 * x)
            driver.upload(self.addr["z"], x.sum(-1).astype(np.float16))
            return True

    class Engine:
        num_io_tensors = 3

        def get_tensor_name(self, i: int) -> str:
            return ["x", "z", "y"][i]  # engine order differs from the io spec's

        def get_tensor_mode(self, n: str) -> str:
            return "in" if n == "x" else "out"

        def get_tensor_dtype(self, n: str) -> Any:
            return np.float16 if n == "z" else np.float32

        def get_tensor_shape(self, n: str) -> tuple[int, ...]:
            return (-1, 4) if n != "z" else (-1,)

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if data == b"engine" else None

    trt.Runtime = Runtime
    return trt


def test_engine_session_binds_io_by_name_and_keeps_the_graphs_output_order(tmp_path: Path) -> None:
    from stages.lib.runtime.backends.engine import EngineSession

    driver = _FakeDriver()
    trt = _fake_trt(driver)
    (tmp_path / "g.engine").write_bytes(b"engine")
    spec = {"outputs": [{"name": "y"}, {"name": "z"}]}
    sess = EngineSession(trt, trt.Runtime(), tmp_path / "g.engine", driver, spec)  # type: ignore[arg-type]
    assert [i.name for i in sess.get_inputs()] == ["x"] and [o.name for o in sess.get_outputs()] == ["y", "z"]
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[1].type == "tensor(float16)"
    assert sess.get_inputs()[0].shape == ["x.0", 4]
    x = np.arange(12, dtype=np.float64).reshape(3, 4)  # cast to the engine's dtype on the way in
    y, z = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(z, x.sum(-1))
    assert z.dtype == np.float16 and y.dtype == np.float32
    (only_z,) = sess.run(["z"], {"x": x[:1]})
    assert only_z.shape == (1,)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        sess.run(None, {"x": np.zeros((2, 5), np.float32)})
    (tmp_path / "bad.engine").write_bytes(b"garbage")
    with pytest.raises(PackageError, match="could not deserialize"):
        EngineSession(trt, trt.Runtime(), tmp_path / "bad.engine", driver, spec)  # type: ignore[arg-type]


class _EngineLike:
    """An engine backend stand-in: engine paths, sessions that answer like EngineSession
    (TensorInfo, numpy dtypes) but compute with onnxruntime over the package's ONNX."""

    name = "tensorrt_rtx"

    def __init__(self, pkg: Any) -> None:
        from stages.lib.runtime.backends.onnxruntime import OrtBackend

        self.pkg, self.ort = pkg, OrtBackend(pkg)

    def path(self, graph: str) -> Path:
        return Path(self.pkg.engine(graph))

    def session(self, graph: str) -> Any:
        from stages.lib.runtime.backends.engine import TensorInfo

        inner = self.ort.session(graph)

        def info(a: Any) -> TensorInfo:
            return TensorInfo(a.name, a.type, [d if isinstance(d, int) else f"{a.name}.{i}" for i, d in enumerate(a.shape)],
                              None)

        class Session:
            def get_inputs(self) -> list[TensorInfo]:
                return [info(a) for a in inner.get_inputs()]

            def get_outputs(self) -> list[TensorInfo]:
                return [info(a) for a in inner.get_outputs()]

            def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                return list(inner.run(names, feeds))

        return Session()

    def describe(self) -> str:
        return "stand-in"

    def close(self) -> None:
        pass


def test_the_pipeline_runs_over_engine_sessions_and_honours_engine_profiles(package: Path, image: Path) -> None:
    from stages.lib.runtime import choose, open_backend
    from stages.lib.runtime.generate import _fit_profile, run_package

    with opened(package) as pkg:
        ort = run_package(pkg, open_backend(pkg, choose(pkg, "onnxruntime")), [image], PROMPT, max_new_tokens=10,
                          stop_at_eos=False)
        eng = run_package(pkg, _EngineLike(pkg), [image], PROMPT, max_new_tokens=10, stop_at_eos=False)
        assert eng.tokens == ort.tokens and eng.extra["notes"] == []
        past_max = pkg.io_spec("decoder")["profile"]["past"]["max"]
        capped = run_package(pkg, _EngineLike(pkg), [image], PROMPT, max_new_tokens=past_max + 50, stop_at_eos=False)
    n = capped.stats.prompt_tokens
    assert capped.stats.new_tokens == past_max - n + 2 and "capped" in capped.extra["notes"][0]
    from stages.lib.hostside.generate import Prompt
    from stages.lib.runtime.errors import UsageError

    with pytest.raises(UsageError, match="the prompt has 9 tokens; the decoder engine takes at most 8"):
        _fit_profile({"seq": {"max": 8}}, Prompt(np.zeros((1, 9), np.int64)), 4, [])
