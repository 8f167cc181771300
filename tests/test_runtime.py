"""The light device runtime (stages/lib/runtime): safe extraction, digests, device compatibility,
``check`` against the packaged gates and ``generate`` on a real package.

The package is the package stage's own ``assemble`` over the real stages' outputs for the tiny
default (checkpoint, reference, export_vision, export_decoder, engine built with TensorRT-RTX for
rtx4090, all FP16), built once per test session. No GPU here: the engine backends are checked
for their refusals (one line each) and, through a stand-in TensorRT module, for their IO binding.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stages.lib.runtime import archive, check_package, compat, opened
from stages.lib.runtime.errors import IncompatibleError, PackageError

REPO = Path(__file__).resolve().parent.parent
TARGET = "rtx4090"
CONFIG: dict[str, Any] = {"name": "rt", "model": {"generate": "tiny", "family": "qwen2_5_vl"}, "targets": [TARGET],
                          "precision": {"vision": "fp16", "decoder": "fp16"}, "engine": {"timing_cache": False}}
CHAIN = ("checkpoint", "reference", "export_vision", "export_decoder")
PROMPT = "describe the picture"


def _stage(name: str, cfg: Any, inputs: dict[str, Path], out: Path) -> None:
    from pipeline.stage import StageContext
    from pipeline.targets import load_catalog

    st = importlib.import_module(f"stages.{name}").STAGE
    t = load_catalog()[TARGET] if st.per_target else None
    out.mkdir(parents=True)
    st.run(StageContext(node_id=name, params=st.params(cfg, t), inputs={d: inputs[d] for d in st.deps}, out=out,
                        target=t.model_dump() if t else None, external=[]))


def build_package(root: Path) -> Path:
    """The FP16 package of the tiny default (``package.tar``), from the real stages' outputs."""
    from pipeline.config import BuildConfig
    from stages.lib.packaging import BuildFolders, assemble

    cfg = BuildConfig.model_validate(CONFIG)
    f: dict[str, Path] = {}
    for name in CHAIN:
        f[name] = root / name
        _stage(name, cfg, f, f[name])
    # an FP16 "quantize" folder: the exported graphs as they are, marked fp16 (what quantize@T
    # writes for precision fp16), so the engines and the package are the FP16 build's
    q = root / "quantize"
    q.mkdir()
    for src, names in ((f["export_vision"], ("vision.onnx", "vision.json")),
                       (f["export_decoder"], ("decoder.onnx", "embed.onnx", "decoder.json"))):
        for n in names:
            shutil.copy(src / n, q / n)
    (q / "quantize.json").write_text(json.dumps({g: {"precision": "fp16"} for g in ("vision", "decoder", "embed")}))
    f["quantize"] = q
    _stage("engine", cfg, f, root / "engine")
    out = root / "package"
    out.mkdir()
    gates = {k: g.model_dump(mode="json") for k, g in cfg.gates.items()}
    res = assemble(out, BuildFolders(engine=root / "engine", quantize=q, checkpoint=f["checkpoint"],
                                     reference=f["reference"]), name="rt", gates=gates)
    (root / "done").write_text(str(res.tar))
    return res.tar


def shared_package(factory: pytest.TempPathFactory) -> Path:
    """One package per pytest session (test_runtime_venv.py reuses it)."""
    root = factory.getbasetemp() / "runtime_package"
    if (root / "done").is_file():
        return Path((root / "done").read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return build_package(root)


def model_path(tar: Path) -> Path:
    return tar.parent.parent / "checkpoint" / "model"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_package(tmp_path_factory)


@pytest.fixture
def unpacked(package: Path, tmp_path: Path) -> Path:
    return archive.extract(package, tmp_path / "x")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from stages.lib.hostside.vision import synthetic_image

    p = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(synthetic_image(150, 190, 7)).save(p)  # not a multiple of 28: the resize runs
    return p


def cli(*args: str, cwd: Path | None = None, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)} if python == sys.executable else dict(os.environ)
    return subprocess.run([python, "-m", "stages.lib.runtime.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# --- safe extraction ----------------------------------------------------------------------------


def _tar(path: Path, bad: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        for name, content in (("pkg/manifest.json", b"{}"), ("pkg/a.txt", b"fine")):
            ti = tarfile.TarInfo(name)
            ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content))
        tf.addfile(bad, io.BytesIO(data) if bad.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    return ti


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo",
                                  "outside_top", "duplicate"])
def test_malicious_archive_is_refused_and_nothing_lands_outside(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "pwned"
    bad = {
        "absolute": _member(str(victim)),
        "dotdot": _member("pkg/../../outside/pwned"),
        "symlink": _member("pkg/link", tarfile.SYMTYPE, str(victim)),
        "hardlink": _member("pkg/hard", tarfile.LNKTYPE, str(victim)),
        "chardev": _member("pkg/tty", tarfile.CHRTYPE),
        "blockdev": _member("pkg/disk", tarfile.BLKTYPE),
        "fifo": _member("pkg/pipe", tarfile.FIFOTYPE),
        "outside_top": _member("other/pwned"),
        "duplicate": _member("pkg/a.txt", data=b"overwritten"),
    }[case]
    tar = _tar(tmp_path / f"{case}.tar", bad, b"x" if bad.isreg() and case != "duplicate" else b"overwritten")
    dest = tmp_path / "dest"
    with pytest.raises(PackageError) as e:
        archive.extract(tar, dest)
    msg = str(e.value)
    assert "\n" not in msg and "refused member" in msg and repr(bad.name) in msg, msg
    assert not victim.exists() and list(outside.iterdir()) == []
    # refused before a byte is written: no destination, no temporary folder, nothing beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside", tar.name])


def test_good_archive_extracts_beside_and_refuses_an_existing_destination(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "ok.tar", _member("pkg/sub/b.txt", data=b"hi"), b"hi")
    root = archive.extract(tar, tmp_path / "dest")
    assert root == tmp_path / "dest" / "pkg" and (root / "sub" / "b.txt").read_bytes() == b"hi"
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["pkg"]  # the temp folder is gone
    with pytest.raises(PackageError, match="already exists"):
        archive.extract(tar, tmp_path / "dest")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PackageError, match="not a readable tar"):
        archive.extract(tmp_path / "junk.tar", tmp_path / "d2")


# --- check on a real package --------------------------------------------------------------------


def test_check_passes_on_the_good_package_with_onnxruntime(package: Path) -> None:
    res = check_package(package, "onnxruntime")
    assert res.exit_code == 0, res.message
    by = {g.graph: g for g in res.graphs}
    assert set(by) == {"vision", "decoder", "generation"}
    assert by["vision"].status == by["decoder"].status == "pass" and by["vision"].precision == "fp16"
    assert by["vision"].figures["cosine"] >= 0.9999 and by["decoder"].figures["top1"] == 1.0
    assert [c["name"] for c in by["vision"].gates] == ["vision.fp16.onnxruntime.cosine",
                                                         "vision.fp16.onnxruntime.norm_ratio"]
    assert by["generation"].figures["tokens"] == 1.0  # fp16 has no token gate: measured, "ungated"
    from stages.lib.packaging import read_member

    assert res.files is not None and res.files.checked == len(json.loads(read_member(package, "manifest.json"))["files"])
    r = cli("check", str(package), "--backend", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and doc["compat"]["backend"] == "onnxruntime"


def test_default_backend_without_a_gpu_is_onnxruntime_and_says_why(package: Path) -> None:
    r = cli("check", str(package))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engines not run: tensorrt_rtx backend needs an NVIDIA GPU with driver; none found" in r.stdout


def test_one_byte_changed_in_any_packaged_file_fails_naming_it(unpacked: Path) -> None:
    files = json.loads((unpacked / "manifest.json").read_text())["files"]
    assert len(files) >= 15
    for rel in files:
        p = unpacked / rel
        orig = p.read_bytes()
        data = bytearray(orig)
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        res = check_package(unpacked, "onnxruntime")
        assert res.exit_code == 1 and f"{rel}: sha256 differs" in res.message, (rel, res.message)
        p.write_bytes(orig)
    assert check_package(unpacked, "onnxruntime").exit_code == 0  # all restored
    victim = "engines/decoder.engine"
    with open(unpacked / victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = cli("check", str(unpacked), "--backend", "onnxruntime")
    assert r.returncode == 1 and f"{victim}: sha256 differs" in r.stdout + r.stderr


def test_unlisted_missing_resized_files_and_unknown_format(unpacked: Path) -> None:
    (unpacked / "engines" / "extra.engine").write_bytes(b"smuggled")
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "engines/extra.engine: not listed in the manifest" in res.message
    (unpacked / "engines" / "extra.engine").unlink()
    (unpacked / "tokenizer" / "tokenizer.json").unlink()
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "tokenizer/tokenizer.json: missing" in res.message
    m = json.loads((unpacked / "manifest.json").read_text())
    (unpacked / "manifest.json").write_text(json.dumps({**m, "format": 2}))
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 2 and "package format 2; this runtime reads format 1" in res.message


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


# --- generate -----------------------------------------------------------------------------------


def test_generate_gives_ortpipelines_tokens_on_the_same_graphs(package: Path, image: Path) -> None:
    from stages.lib.hostside.generate import OrtPipeline
    from stages.lib.runtime import choose, open_backend
    from stages.lib.runtime.generate import run_package

    streamed: list[str] = []
    with opened(package) as pkg:
        backend = open_backend(pkg, choose(pkg, "onnxruntime"))
        gen = run_package(pkg, backend, [image], PROMPT, max_new_tokens=14, stop_at_eos=False,
                          write=streamed.append)
        ref = OrtPipeline.from_folder(pkg.onnx_dir, pkg.onnx_dir).generate(gen.extra["prompt"], 14)
    assert gen.tokens == ref[0].tolist() and len(set(gen.tokens)) > 4
    assert "".join(streamed) == gen.text and gen.stats.new_tokens == 14 and gen.stats.ttft_s > 0
    r = cli("generate", str(package), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "14",
            "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == gen.tokens
    r = cli("generate", str(package), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "14",
            "--ignore-eos")
    assert r.returncode == 0 and r.stdout.strip() == gen.text.strip()
    assert "time to first token" in r.stderr and "tokens/s" in r.stderr


def test_eos_stops_and_sampling_is_seeded(package: Path, image: Path) -> None:
    from stages.lib.runtime import Sampling, choose, open_backend
    from stages.lib.runtime.generate import run_package

    with opened(package) as pkg:
        backend = open_backend(pkg, choose(pkg, "onnxruntime"))
        greedy = run_package(pkg, backend, [image], PROMPT, max_new_tokens=40, stop_at_eos=False)
        s = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=11)
        a = run_package(pkg, backend, [image], PROMPT, max_new_tokens=12, sampling=s, stop_at_eos=False)
        b = run_package(pkg, backend, [image], PROMPT, max_new_tokens=12, sampling=s, stop_at_eos=False)
        stop = set(pkg.runtime["stop_token_ids"])
    assert a.tokens == b.tokens and a.tokens != greedy.tokens[:12]
    if stop & set(greedy.tokens):  # stopping at EOS: the same tokens up to and including it
        first = next(i for i, t in enumerate(greedy.tokens) if t in stop)
        with opened(package) as pkg:
            backend = open_backend(pkg, choose(pkg, "onnxruntime"))
            stopped = run_package(pkg, backend, [image], PROMPT, max_new_tokens=40)
        assert stopped.tokens == greedy.tokens[: first + 1] and stopped.stats.stopped == "eos"


def test_prompt_equals_the_checkpoints_processor(package: Path, image: Path) -> None:
    """Template, tokenizer, resize and patchify without transformers == the HF processor's output."""
    from PIL import Image

    from stages.lib.checkpoints.local import load_processor
    from stages.lib.runtime.prompt import QWEN_VL_TEMPLATE, build_prompt, load_assets

    ip, tok = load_processor(model_path(package))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(msgs, chat_template=QWEN_VL_TEMPLATE, tokenize=False, add_generation_prompt=True)
    out = ip(images=[Image.open(image).convert("RGB")], return_tensors="np")
    n = int(np.prod(out["image_grid_thw"][0])) // 4
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
    with opened(package) as pkg:
        assets = load_assets(pkg.tokenizer_dir, pkg.runtime["generation"], pkg.runtime["stop_token_ids"])
        p = build_prompt(assets, pkg.text_spec(), pkg.vision_spec(), [image], PROMPT)
    assert assets.template_source.startswith("built-in")  # the tiny checkpoint ships no chat template
    assert p.input_ids[0].tolist() == ids
    np.testing.assert_array_equal(p.image_grid_thw, out["image_grid_thw"])
    np.testing.assert_allclose(p.pixel_values, out["pixel_values"], rtol=0, atol=1e-6)


def test_bad_generate_usage_is_exit_2(package: Path, tmp_path: Path) -> None:
    r = cli("generate", str(package), "--image", str(tmp_path / "nope.png"), "--prompt", "x")
    assert r.returncode == 2 and "no such file" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    r = cli("generate", str(package), "--image", str(tmp_path / "bad.png"), "--prompt", "x", "--backend", "onnxruntime")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.png'} is corrupt or not an image (PIL cannot identify its format); expected an RGB "
        "image (png, jpg, bmp, webp, gif, tiff)"]
    r = cli("generate", str(package), "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and "--max-new-tokens" in r.stderr


def test_check_and_generate_import_neither_torch_nor_transformers(package: Path, image: Path) -> None:
    code = (
        "import sys\n"
        "from stages.lib.runtime.cli import main\n"
        f"assert main(['check', {str(package)!r}, '--backend', 'onnxruntime', '--json']) == 0\n"
        f"assert main(['generate', {str(package)!r}, '--image', {str(image)!r}, '--prompt', 'hi', "
        "'--max-new-tokens', '3', '--json', '--backend', 'onnxruntime']) == 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx', 'tensorrt', "
        "'tensorrt_rtx_bindings', 'polygraphy', 'onnxscript'})\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import stages.lib.runtime"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert r.returncode == 0 and not imported & {"torch", "transformers", "onnx", "onnxruntime", "tensorrt"}, imported


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


def _rewrite(pkg_dir: Path, rel: str, data: bytes) -> None:
    """Change a packaged file *and* its manifest entry (a consistent, re-digested package)."""
    import hashlib

    (pkg_dir / rel).write_bytes(data)
    m = json.loads((pkg_dir / "manifest.json").read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (pkg_dir / "manifest.json").write_text(json.dumps(m))


def test_the_packaged_gates_decide(unpacked: Path) -> None:
    probe = json.loads((unpacked / "probe" / "probe.json").read_text())
    probe["gates"]["vision"]["gate"]["cosine"] = 1.0  # no FP16 graph is bit-exact: this gate misses
    probe["gates"]["decoder"]["gate"]["tokens"] = 1.0  # generation is gated by the decoder's tokens
    _rewrite(unpacked, "probe/probe.json", json.dumps(probe).encode())
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "gate missed on onnxruntime: vision.fp16.onnxruntime.cosine " in res.message
    assert res.message.endswith("(needs >= 1)")
    by = {g.graph: g for g in res.graphs}
    assert by["vision"].status == "fail" and by["decoder"].status == "pass" and by["generation"].status == "pass"
    r = cli("check", str(unpacked), "--backend", "onnxruntime")
    assert r.returncode == 1 and "vision.fp16.onnxruntime.cosine" in r.stdout and "FAIL" in r.stderr


def test_register_plugs_into_the_vlmforge_cli(package: Path) -> None:
    """pipeline.cli loads command modules by name (VLMFORGE_COMMAND_MODULES here; the stage
    layer's COMMAND_MODULES once the lead lists stages.lib.runtime.cli there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMFORGE_COMMAND_MODULES": "stages.lib.runtime.cli"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(package), "--backend", "onnxruntime",
                        "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout


def test_chat_template_sources_and_refusals(unpacked: Path) -> None:
    from stages.lib.runtime.errors import UsageError
    from stages.lib.runtime.prompt import load_assets, render

    tok = unpacked / "tokenizer"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "cfg:{{ messages[0].role }}"}))
    assert render(load_assets(tok), msgs) == "cfg:user"
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ eos_token }}"}))
    assert render(load_assets(tok), msgs) == "json:<|im_end|>"
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role != 'user' %}{{ raise_exception('only users here') }}{% endif %}"
        "{{ m.content[-1].text }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    a = load_assets(tok)
    assert a.template_source == "tokenizer/chat_template.jinja" and render(a, msgs) == "hello>"
    with pytest.raises(UsageError, match="the chat template refused the prompt: only users here"):
        render(a, [{"role": "system", "content": "x"}])
