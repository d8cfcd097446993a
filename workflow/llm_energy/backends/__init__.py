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
    "openai_server": "llm_energy.backends.openai_server:OpenAIServerBackend",
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; known backends: {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def create_backend(name: str, settings: dict | None = None) -> Backend:
    """The backend, run as it declares (Backend.execution): in this process, or worker processes behind
    llm_energy.data_parallel (one per data-parallel replica, or the ranks of a tensor-parallel model)."""
    from llm_energy.backends.base import LAUNCH_DATA_PARALLEL, LAUNCH_TENSOR_PARALLEL

    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendError(f"backend '{name}' cannot run here: {reason}")
    execution = cls.execution(dict(settings or {}))
    if execution.launch in (LAUNCH_DATA_PARALLEL, LAUNCH_TENSOR_PARALLEL):
        from llm_energy.data_parallel import TENSOR, DataParallelBackend

        if execution.launch == LAUNCH_DATA_PARALLEL:
            return DataParallelBackend(name, dict(settings or {}), execution.data_parallel, execution.barrier_timeout_s)
        return DataParallelBackend(
            name, dict(settings or {}), execution.tensor_parallel, execution.barrier_timeout_s, mode=TENSOR
        )
    return cls(settings)


def require_installed(names: list[str], backend_settings: dict | None = None, used: set[str] | None = None) -> None:
    """Stop before any job runs when a selected backend, or one of its settings (backend_settings.<name>),
    cannot run in this environment: the backend's settings, and those of each of its variants.
    `used`: the backends that have experiments (a backend every experiment of which is excluded runs
    nothing, so it need not be installed); None: every name."""
    from llm_energy.config import backend_variants
    from llm_energy.errors import ConfigError

    for index, name in enumerate(names):
        if used is not None and name not in used:
            continue
        cls = backend_class(name)
        reason = cls.unavailable_reason()
        if reason:
            raise ConfigError(
                f"backends[{index}]",
                f"backend '{name}' is selected but cannot run in this environment: {reason}",
                "Install it as said, or run with --software-deployment-method conda (envs/ brings each engine).",
            )
        configured = (backend_settings or {}).get(name) or {}
        for variant, settings in backend_variants(configured).items():
            try:
                cls.check_settings(dict(settings))
            except ConfigError as exc:
                if variant is None:
                    raise
                # Name the key where the setting was made: the variant's own, or the shared one it inherits.
                leaf = exc.key.rsplit(".", 1)[-1]
                overrides = (configured.get("variants") or {}).get(variant) or {}
                key = f"backend_settings.{name}.variants.{variant}.{leaf}" if leaf in overrides else exc.key
                raise ConfigError(key, f"{exc.problem} (variant '{variant}')", exc.fix) from None
