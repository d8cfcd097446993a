"""Unit tests of llm_energy.backends.batching: exact batch compositions of each strategy."""

from __future__ import annotations

import pytest
from llm_energy.backends.base import Request
from llm_energy.backends.batching import STRATEGIES, make_batches, padded_tokens


def requests_of(lengths: list[int]) -> list[Request]:
    """Requests whose index is their position and whose prompt has the given number of tokens."""
    return [Request(index=i, prompt_token_ids=tuple(range(100, 100 + n))) for i, n in enumerate(lengths)]


def indices(batches: list[list[Request]]) -> list[list[int]]:
    return [[r.index for r in batch] for batch in batches]


LENGTHS = [10, 50, 20, 30, 40]  # request i has LENGTHS[i] prompt tokens


def test_strategies() -> None:
    assert STRATEGIES == ("fixed", "sorted", "token_budget")


def test_padded_tokens() -> None:
    batch = requests_of([3, 7, 5])
    assert padded_tokens(batch, max_output_tokens=4) == 3 * (7 + 4)
    assert padded_tokens(batch[:1], max_output_tokens=0) == 3


def test_fixed_keeps_dataset_order() -> None:
    requests = requests_of(LENGTHS)
    assert indices(make_batches(requests, 2)) == [[0, 1], [2, 3], [4]]
    assert indices(make_batches(requests, 2, "fixed")) == [[0, 1], [2, 3], [4]]
    assert indices(make_batches(requests, 1)) == [[0], [1], [2], [3], [4]]
    assert indices(make_batches(requests, 5)) == [[0, 1, 2, 3, 4]]
    assert indices(make_batches(requests, 64)) == [[0, 1, 2, 3, 4]]
    # The same objects come back, nothing copied or re-tokenized.
    assert make_batches(requests, 5)[0][1] is requests[1]


def test_sorted_longest_first() -> None:
    requests = requests_of(LENGTHS)
    assert indices(make_batches(requests, 2, "sorted")) == [[1, 4], [3, 2], [0]]
    assert indices(make_batches(requests, 3, "sorted")) == [[1, 4, 3], [2, 0]]


def test_sorted_is_stable_for_equal_lengths() -> None:
    assert indices(make_batches(requests_of([5, 5, 5, 5]), 2, "sorted")) == [[0, 1], [2, 3]]
    assert indices(make_batches(requests_of([3, 5, 3, 5, 4]), 2, "sorted")) == [[1, 3], [4, 0], [2]]
    assert indices(make_batches(requests_of([2, 2, 9, 2]), 3, "token_budget", token_budget=1000)) == [[2, 0, 1], [3]]


def test_sorted_and_fixed_do_not_mutate_input() -> None:
    requests = requests_of(LENGTHS)
    snapshot = list(requests)
    make_batches(requests, 2, "sorted")
    make_batches(requests, 2, "token_budget", token_budget=100, max_output_tokens=5)
    assert requests == snapshot


def test_token_budget_exact_composition() -> None:
    requests = requests_of(LENGTHS)
    # Longest first: 50(1) 40(4) 30(3) 20(2) 10(0); padded = n x (longest + 10 output tokens).
    # [1] 60, [1,4] 120 <= 130, [1,4,3] 180 > 130 -> close; [3] 40, [3,2] 80, [3,2,0] 120 -> close at end.
    batches = make_batches(requests, 3, "token_budget", token_budget=130, max_output_tokens=10)
    assert indices(batches) == [[1, 4], [3, 2, 0]]
    assert [padded_tokens(b, 10) for b in batches] == [120, 120]


def test_token_budget_capped_by_batch_size() -> None:
    requests = requests_of(LENGTHS)
    batches = make_batches(requests, 2, "token_budget", token_budget=130, max_output_tokens=10)
    assert indices(batches) == [[1, 4], [3, 2], [0]]
    # A huge budget: only batch_size limits the batches, which then equal sorted batching.
    assert indices(make_batches(requests, 2, "token_budget", token_budget=10**9)) == indices(
        make_batches(requests, 2, "sorted")
    )


def test_token_budget_tight_budget_one_request_per_batch() -> None:
    requests = requests_of(LENGTHS)
    batches = make_batches(requests, 4, "token_budget", token_budget=60, max_output_tokens=10)
    # 60 fits [50+10] alone; 2 x (40+10) = 100 > 60, 2 x (30+10) = 80 > 60, [20, 10] = 2 x 30 = 60 fits.
    assert indices(batches) == [[1], [4], [3], [2, 0]]


@pytest.mark.parametrize("budget", [40, 64, 100, 128, 333, 1000])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_token_budget_respected_and_complete(budget: int, batch_size: int) -> None:
    lengths = [7, 31, 12, 12, 25, 3, 18, 40, 9, 22]
    requests = requests_of(lengths)
    batches = make_batches(requests, batch_size, "token_budget", token_budget=budget, max_output_tokens=8)
    # Every request exactly once.
    assert sorted(r.index for b in batches for r in b) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        # Only a batch of a single request may exceed the budget (it cannot be split further).
        assert padded_tokens(batch, 8) <= budget or len(batch) == 1
    # Greedy: adding the next request to a batch would have broken a limit.
    for batch, following in zip(batches, batches[1:]):
        grown = batch + [following[0]]
        assert len(grown) > batch_size or padded_tokens(grown, 8) > budget


def test_single_over_budget_request_alone() -> None:
    requests = requests_of([10, 200, 10])
    batches = make_batches(requests, 4, "token_budget", token_budget=100, max_output_tokens=0)
    assert indices(batches) == [[1], [0, 2]]
    assert padded_tokens(batches[0], 0) == 200  # over the budget, but alone


def test_empty_requests() -> None:
    assert make_batches([], 4) == []
    assert make_batches([], 4, "sorted") == []
    assert make_batches([], 4, "token_budget", token_budget=10) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 2, "strategy": "random"}, "unknown batching strategy 'random'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": -1, "strategy": "sorted"}, "batch_size must be >= 1"),
        ({"batch_size": 2, "strategy": "token_budget"}, "needs a positive token_budget"),
        ({"batch_size": 2, "strategy": "token_budget", "token_budget": 0}, "needs a positive token_budget"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_batches(requests_of(LENGTHS), **kwargs)
