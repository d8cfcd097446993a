"""Registry of inference backends by name. Adding a backend is one module and one line here."""

from __future__ import annotations

import importlib

from llm_energy.backends.base import Backend
from llm_energy.errors import BackendError

# name -> "module:Class"; modules are imported lazily so that a missing engine (vllm, tensorrt_llm)
# does not break the others.
BACKENDS: dict[str, str] = {
    "pytorch": "llm_energy.backends.pytorch:PytorchBackend",
    "vllm": "llm_energy.backends.vllm:VllmBackend",
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; known backends: {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def create_backend(name: str, settings: dict | None = None) -> Backend:
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendError(f"backend '{name}' cannot run here: {reason}")
    return cls(settings)


def require_installed(names: list[str], backend_settings: dict | None = None) -> None:
    """Stop before any job runs when a selected backend, or a setting of it (quantization), cannot
    run in this environment."""
    from llm_energy.errors import ConfigError

    for index, name in enumerate(names):
        reason = backend_class(name).unavailable_reason()
        if reason:
            raise ConfigError(
                f"backends[{index}]", f"backend '{name}' is selected but cannot run in this environment: {reason}",
                "Install it as said, or run with --software-deployment-method conda (envs/ brings each engine).",
            )
    if "pytorch" in names:
        from llm_energy.backends import quantization

        pytorch = (backend_settings or {}).get("pytorch") or {}
        reason = quantization.unsupported_reason(pytorch.get("quantization"), pytorch.get("device", "auto"))
        if reason:
            raise ConfigError(quantization.SETTING_KEY, reason, "Install what is named, or choose another method.")
