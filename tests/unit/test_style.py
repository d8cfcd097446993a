"""Lint and format are checks, not advice: ruff (lint and format) over the package, tests, scripts and
benchmarks, snakefmt over the Snakefile and the rules, with the settings in pyproject.toml. A failure
prints what to run: `ruff format . && ruff check --fix . && snakefmt Snakefile workflow/rules`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FIX = "run `ruff format . && ruff check --fix . && snakefmt Snakefile workflow/rules` from the repository root"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("command", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=" ".join)
def test_ruff_is_clean(command: tuple[str, ...]) -> None:
    result = _run(str(BIN / command[0]), *command[1:])
    assert result.returncode == 0, f"{' '.join(command)} found problems ({FIX}):\n{result.stdout}{result.stderr}"


def test_snakefmt_is_clean() -> None:
    result = _run(str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert result.returncode == 0, f"snakefmt --check found problems ({FIX}):\n{result.stdout}{result.stderr}"
