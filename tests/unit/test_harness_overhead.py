"""harness_overhead.py's own decision when a run has a deadline: which round is the last."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "harness_overhead", REPO_ROOT / "workflow" / "benchmarks" / "harness_overhead.py"
)
harness_overhead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness_overhead)
fits = harness_overhead.another_round_fits


def test_without_a_deadline_every_round_runs() -> None:
    assert fits(rounds_done=40, last_round_s=9.0, now=1e6, deadline=None)


def test_a_round_runs_only_if_one_as_long_as_the_last_ends_by_the_deadline() -> None:
    assert fits(rounds_done=10, last_round_s=9.0, now=491.0, deadline=500.0)
    assert not fits(rounds_done=10, last_round_s=9.0, now=491.1, deadline=500.0)


def test_two_rounds_run_even_past_the_deadline_for_a_confidence_interval() -> None:
    assert fits(rounds_done=1, last_round_s=9.0, now=600.0, deadline=500.0)
    assert not fits(rounds_done=2, last_round_s=9.0, now=600.0, deadline=500.0)
