"""Shared test set-up: offline hub, a private HF cache, quiet CodeCarbon, and built-in tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any test module imports transformers/datasets: without these a hub id spends 20 s retrying
# and `datasets` makes a telemetry request even for local files.
_HF_HOME = tempfile.mkdtemp(prefix="llm-energy-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _build(tiny_models_dir: Path, name: str, architecture: str) -> Path:
    from llm_energy import models

    out = tiny_models_dir / name
    if not (out / "manifest.json").is_file():
        spec = {
            "source": "builtin",
            "architecture": architecture,
            "seed": 0,
            "trust_remote_code": False,
            "max_model_len": None,
            "save_dtype": "float32",
        }
        models.prepare_model(name, spec, out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_models_dir) -> Path:
    """Folder of the built-in tiny Llama (manifest.json + weights/)."""
    return _build(tiny_models_dir, "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models_dir) -> Path:
    return _build(tiny_models_dir, "tiny-gpt2", "gpt2")


def pytest_terminal_summary(terminalreporter):
    """Print the measured wall-clock times of the workflow runs (e.g. the default campaign)."""
    from tests.workflow.helpers import MEASURED_TIMES_S

    if MEASURED_TIMES_S:
        terminalreporter.section("measured workflow times")
        for label, seconds in MEASURED_TIMES_S.items():
            terminalreporter.write_line(f"{label}: {seconds:.1f} s")


@pytest.fixture(scope="session")
def tiny_llama_weights(tiny_llama) -> Path:
    """The tiny Llama's weights folder, as engines load it."""
    from llm_energy import models

    return models.resolve_model_path(tiny_llama)
