"""Batching strategies for engines that run static batches (the pytorch backend).

- fixed: batches of `batch_size` in dataset order (what a naive script does);
- sorted: requests sorted by prompt length (longest first) before chunking, so batches pad less;
- token_budget: adaptive batches, longest first, grown while the padded tokens of the batch
  (requests x (longest prompt + max_output_tokens)) stay within `token_budget`, capped at batch_size.
Continuous-batching engines (vLLM) schedule requests themselves and ignore these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llm_energy.backends.base import Request

STRATEGIES = ("fixed", "sorted", "token_budget")


def padded_tokens(batch: Sequence[Request], max_output_tokens: int) -> int:
    return len(batch) * (max(r.input_tokens for r in batch) + max_output_tokens)


def batches_for_settings(
    requests: Sequence[Request], batch_size: int, settings: Mapping[str, Any], max_output_tokens: int
) -> list[list[Request]]:
    """make_batches with a backend's settings (batching: fixed by default, token_budget)."""
    return make_batches(
        requests, batch_size, settings.get("batching", "fixed"), settings.get("token_budget"), max_output_tokens
    )


def make_batches(
    requests: Sequence[Request],
    batch_size: int,
    strategy: str = "fixed",
    token_budget: int | None = None,
    max_output_tokens: int = 0,
) -> list[list[Request]]:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown batching strategy '{strategy}'; known: {STRATEGIES}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if strategy == "fixed":
        ordered = list(requests)
    else:
        # Stable sort: equal lengths keep dataset order, so batches are reproducible.
        ordered = sorted(requests, key=lambda r: -r.input_tokens)
    if strategy != "token_budget":
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if not token_budget:
        raise ValueError("batching 'token_budget' needs a positive token_budget")
    batches: list[list[Request]] = []
    current: list[Request] = []
    for request in ordered:
        candidate = current + [request]
        if current and (len(candidate) > batch_size or padded_tokens(candidate, max_output_tokens) > token_budget):
            batches.append(current)
            current = [request]
        else:
            current = candidate
    if current:
        batches.append(current)
    return batches
