"""The checks that run every time: ruff over the whole tree and mypy over the package.

    .venv/bin/ruff check src tests bench examples
    .venv/bin/mypy src

They run as tests so that the README's one test command (and so CI) enforces them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing() -> None:
    done = _run(str(BIN / "ruff"), "check", "src", "tests", "bench", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_finds_nothing() -> None:
    done = _run(sys.executable, "-m", "mypy", "src")
    assert done.returncode == 0, done.stdout + done.stderr
