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
