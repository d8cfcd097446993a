"""Hugging Face hub settings, read at call time.

huggingface_hub and datasets read their environment variables once, at import; a user (or a test)
may set them later, so the models and datasets stages read them here, each time.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE_STRINGS = {"1", "ON", "YES", "TRUE"}


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE_STRINGS


def offline(*library_variables: str) -> bool:
    """Offline mode: HF_HUB_OFFLINE, or a library's own switch (TRANSFORMERS_OFFLINE,
    HF_DATASETS_OFFLINE), or the flag huggingface_hub read at import."""
    from huggingface_hub import constants

    return any(env_true(v) for v in ("HF_HUB_OFFLINE", *library_variables)) or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The hub download cache a user may have populated: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
