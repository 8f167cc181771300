from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE = "tests.fake_stages.source,tests.fake_stages.middle,tests.fake_stages.other,tests.fake_stages.final"

BASE_CONFIG = """
name: fake
model: {generate: tiny, family: qwen2_vl}
targets: [rtx3090, rtx4090]
"""


class Cli:
    """Runs the real `vlmforge` entry point in a subprocess, against a private artifacts folder."""

    def __init__(self, tmp: Path, stages: str = FAKE):
        self.tmp = tmp
        self.env = {**os.environ, "VLMFORGE_ARTIFACTS": str(tmp / "artifacts"), "PYTHONPATH": str(REPO),
                    "VLMFORGE_STAGE_MODULES": stages}

    def config(self, text: str = BASE_CONFIG, name: str = "fake.yaml") -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def __call__(self, *args: str, check: int | None = 0, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=self.tmp, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        if check is not None and r.returncode != check:
            raise AssertionError(f"exit {r.returncode} (wanted {check})\nstdout:{r.stdout}\nstderr:{r.stderr}")
        return r

    def json(self, *args: str, check: int | None = 0) -> object:
        return json.loads(self(*args, "--json", check=check).stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


# Fixtures shared by the split test modules (runtime_*, input_faults_*): defined once here, where
# pytest finds them for every module; a module that defines its own fixture of the same name wins.
@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's device package, built once per session (tests.runtime_package)."""
    from tests.runtime_package import shared_package

    return shared_package(tmp_path_factory)


@pytest.fixture
def unpacked(package: Path, tmp_path: Path) -> Path:
    from stages.lib.runtime import archive

    return archive.extract(package, tmp_path / "x")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.runtime_package import photo

    return photo(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Qwen2-VL checkpoint (the input-fault tests damage copies of it)."""
    from stages.lib.checkpoints.tiny import generate_tiny

    return generate_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl", seed=0)


@pytest.fixture
def copy(tiny: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny, tmp_path / "ck"))
