"""Errors a user can cause. Each names what was wrong, where, and what to do."""


class LlmEnergyError(Exception):
    """Base class for every error raised on purpose by llm_energy."""


class ConfigError(LlmEnergyError):
    """The campaign configuration is invalid. The message names the config key and the fix."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config key '{key}': {problem}. {fix}")


class ArtifactError(LlmEnergyError):
    """An artifact file is missing, malformed, of the wrong type or of an unsupported version."""


class SourceUnavailableError(LlmEnergyError):
    """A model or dataset source cannot be reached (e.g. a hub id with no network)."""


class BackendError(LlmEnergyError):
    """An inference backend failed (not installed, out of memory, unsupported model)."""
