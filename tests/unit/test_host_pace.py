"""host_pace.py: the window arithmetic on given counts, and a short real run on this machine's CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "workflow" / "benchmarks"))

import host_pace  # noqa: E402


def host_record(pressure_s, steal_s, throttled_s=0.0, cpus=4):
    return {"pressure_some_s": pressure_s, "steal_s": steal_s, "throttled_s": throttled_s, "cpus": cpus}


def test_modes_parse_and_name_the_option_when_wrong() -> None:
    assert host_pace.parse_mode("1") == (1, False)
    assert host_pace.parse_mode("4-pinned") == (4, True)
    for wrong in ("0", "two", "2-bound", "-pinned"):
        with pytest.raises(SystemExit, match="--modes"):
            host_pace.parse_mode(wrong)


def test_longer_windows_are_sums_of_consecutive_base_windows() -> None:
    chunks = [100, 80, 120, 100, 100, 100, 7]  # the 7th is dropped at factor 3 (a partial group)
    base = host_pace.describe_windows(chunks[:6], window_s=0.5, factor=1)
    assert base["window_s"] == 0.5 and base["windows"] == 6
    assert base["chunks_per_s_mean"] == pytest.approx(200.0)
    assert base["slowest_rel"] == pytest.approx(0.8) and base["fastest_rel"] == pytest.approx(1.2)
    grouped = host_pace.describe_windows(chunks, window_s=0.5, factor=3)
    assert grouped["windows"] == 2 and grouped["window_s"] == 1.5
    assert grouped["chunks_per_s_mean"] == pytest.approx(200.0)
    assert grouped["chunks_per_s_cv"] == pytest.approx(0.0)  # 300 and 300 chunks: the spread averaged out


def test_host_take_is_the_largest_share_at_each_window_length() -> None:
    records = [host_record(0.1, 0.0), host_record(0.0, 0.4), host_record(0.3, 0.0), host_record(0.0, 0.0)]
    base = host_pace.host_take(records, window_s=1.0, factor=1)
    assert base["pressure_some_max_share"] == pytest.approx(0.3)  # of the wall time
    assert base["steal_max_share"] == pytest.approx(0.1)  # of the CPU time: 0.4 s of 4 CPUs x 1 s
    assert base["throttled_s_total"] == 0.0
    paired = host_pace.host_take(records, window_s=1.0, factor=2)
    assert paired["pressure_some_max_share"] == pytest.approx(0.15)  # (0.3 + 0.0) / 2 s
    assert paired["steal_max_share"] == pytest.approx(0.05)


def test_an_unavailable_counter_stays_unavailable_never_zero() -> None:
    records = [host_record(None, 0.0, throttled_s=None), host_record(None, 0.0, throttled_s=None)]
    take = host_pace.host_take(records, window_s=1.0, factor=1)
    assert take["pressure_some_max_share"] is None
    assert take["throttled_s_total"] is None
    assert take["steal_max_share"] == 0.0


def test_a_short_real_run_counts_chunks_in_every_window(tmp_path: Path) -> None:
    out = tmp_path / "pace.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "workflow" / "benchmarks" / "host_pace.py"),
            "--windows",
            "4",
            "--window-s",
            "0.25",
            "--aggregate",
            "2",
            "--modes",
            "1,1-pinned,2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert [(m["procs"], m["pinned"]) for m in result["modes"]] == [(1, False), (1, True), (2, False)]
    for mode in result["modes"]:
        assert len(mode["chunks_per_window"]) == mode["procs"]
        # A 0.25 s window holds many 2 ms chunks, however loaded the machine: none is empty.
        assert all(len(counts) == 4 and min(counts) > 0 for counts in mode["chunks_per_window"])
        assert len(mode["host_cpu"]) == 4 and all("steal_s" in r for r in mode["host_cpu"])
        assert mode["start_unix_s"] > 1.7e9 and mode["start_monotonic_s"] > 0
    lengths = {(r["mode"], r["window_s"]) for r in result["rows"]}
    assert ("2", 0.5) in lengths and ("1-pinned", 0.25) in lengths
    assert result["host"]["cpu_count"] >= 1
    assert "chunks/s" in completed.stdout  # the printed table


def test_pinning_more_processes_than_cpus_names_the_option() -> None:
    with pytest.raises(SystemExit, match="--modes: 4096-pinned needs 4096 CPUs"):
        host_pace.run_mode(4096, True, 100, 0.1, 2)
