"""Decoding settings the engine tests share."""

from llm_energy.backends.base import DecodingSettings


def greedy(output_length: str = "fixed", max_output_tokens: int = 12) -> DecodingSettings:
    return DecodingSettings(mode="greedy", output_length=output_length, max_output_tokens=max_output_tokens)
