"""build_proof's own arithmetic: several harness-overhead runs merged with their commits, and the
targets' met/conclusive verdicts (the H200 tree's proof.json is built by it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("build_proof", REPO_ROOT / "workflow" / "benchmarks" / "build_proof.py")
build_proof = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_proof)


def _row(path: str | None, batch: int, arm: str, ratio: float, low: float, high: float, **extra) -> dict:
    """A harness_overhead.py row as older files wrote it (no `backend`: pytorch) unless `extra` adds it."""
    return {
        **extra,
        "batch_size": batch,
        "pytorch_path": path,
        "arm": arm,
        "ratio": ratio,
        "ci95_low": low,
        "ci95_high": high,
        "n": 5,
        "bare_output_tokens_per_s": 100.0,
        "arm_output_tokens_per_s": 100.0 * ratio,
    }


def test_overhead_runs_merge_with_each_rows_commit_and_the_first_bandwidth(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "git_commit": "aaa",
                "measured_copy_bandwidth_bytes_per_s": None,
                "rows": [_row("eager", 8, "full", 0.95, 0.76, 1.14)],
            }
        )
    )
    (tmp_path / "b.json").write_text(
        json.dumps(
            {
                "git_commit": "bbb",
                "measured_copy_bandwidth_bytes_per_s": 4.2e12,
                "rows": [_row("fast", 1, "full", 1.0, 0.87, 1.13)],
            }
        )
    )
    merged = build_proof.load_overhead([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(r["pytorch_path"], r["git_commit"], r["source"]) for r in merged["rows"]] == [
        ("eager", "aaa", "a.json"),
        ("fast", "bbb", "b.json"),
    ]
    assert merged["measured_copy_bandwidth_bytes_per_s"] == 4.2e12


def test_a_later_overhead_run_replaces_the_rows_it_remeasured(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(
        json.dumps(
            {
                "git_commit": "aaa",
                "rows": [
                    _row("fast", 8, "full", 1.03, 0.94, 1.13),
                    _row("fast", 8, "no_sampler", 1.06, 0.93, 1.20),
                    _row("fast", 1, "full", 1.0, 0.87, 1.13),
                ],
            }
        )
    )
    (tmp_path / "new.json").write_text(
        json.dumps({"git_commit": "bbb", "rows": [_row("fast", 8, "full", 0.99, 0.98, 1.00)]})
    )
    merged = build_proof.load_overhead([tmp_path / "old.json", tmp_path / "new.json"])
    by_key = {(r["batch_size"], r["arm"]): (r["ratio"], r["git_commit"]) for r in merged["rows"]}
    assert by_key == {(8, "full"): (0.99, "bbb"), (8, "no_sampler"): (1.06, "aaa"), (1, "full"): (1.0, "aaa")}


def test_runs_of_one_commit_pool_their_rounds_and_a_later_commit_supersedes(tmp_path: Path) -> None:
    def rounds(ratios: list[float], bare: list[float], pace: float) -> dict:
        return {
            "ratios": ratios,
            "bare_window_output_tokens_per_s": bare,
            "arm_window_output_tokens_per_s": [r * b for r, b in zip(ratios, bare)],
            "arm_repeat_time_cv_in_window": pace,
            "bare_repeat_time_cv_in_window": 0.02,
            "arm_gpu_energy_per_output_token_j": 0.7,
        }

    first = _row("fast", 1, "full", 0.95, 0.9, 1.0, **rounds([0.9, 1.0, 0.95], [300.0, 360.0, 330.0], 0.04))
    second = _row("fast", 1, "full", 1.0, 0.98, 1.02, **rounds([0.99, 1.01], [380.0, 370.0], 0.01))
    (tmp_path / "first.json").write_text(json.dumps({"git_commit": "bbb", "rows": [first]}))
    (tmp_path / "second.json").write_text(json.dumps({"git_commit": "bbb", "rows": [second]}))
    merged = build_proof.load_overhead([tmp_path / "first.json", tmp_path / "second.json"])
    (pooled,) = merged["rows"]
    assert pooled["n"] == 5 and pooled["ratios"] == [0.9, 1.0, 0.95, 0.99, 1.01]
    assert pooled["ratio"] == pytest.approx(0.97)
    # t(0.975, 4) = 2.776, std of the five ratios = 0.04528
    assert pooled["ci95_low"] == pytest.approx(0.97 - 2.776 * 0.04528 / 5**0.5, abs=1e-4)
    assert pooled["bare_output_tokens_per_s"] == pytest.approx((300 + 360 + 330 + 380 + 370) / 5)
    assert pooled["arm_repeat_time_cv_in_window"] == pytest.approx((3 * 0.04 + 2 * 0.01) / 5)
    assert pooled["source"] == "first.json + second.json"
    assert "arm_window_host_cpu" not in pooled  # neither run recorded what the host took

    # Host-CPU lists pool where both runs have them, and are left out where one lacks them.
    taken = {"throttled_s": 0.0, "pressure_some_s": 0.01, "steal_s": None}
    first_host = {**first, "arm_window_host_cpu": [taken] * 3, "bare_window_host_cpu": [taken] * 3}
    second_host = {**second, "arm_window_host_cpu": [taken] * 2, "bare_window_host_cpu": [taken] * 2}
    for later, expected in ((second_host, 5), (second, None)):
        (tmp_path / "first.json").write_text(json.dumps({"git_commit": "bbb", "rows": [first_host]}))
        (tmp_path / "second.json").write_text(json.dumps({"git_commit": "bbb", "rows": [later]}))
        (pooled,) = build_proof.load_overhead([tmp_path / "first.json", tmp_path / "second.json"])["rows"]
        assert (len(pooled["bare_window_host_cpu"]) if "bare_window_host_cpu" in pooled else None) == expected
    (tmp_path / "first.json").write_text(json.dumps({"git_commit": "bbb", "rows": [first]}))

    # The same rows under another commit: the later run replaces, it does not pool.
    (tmp_path / "second.json").write_text(json.dumps({"git_commit": "ccc", "rows": [second]}))
    merged = build_proof.load_overhead([tmp_path / "first.json", tmp_path / "second.json"])
    assert [(r["ratio"], r["n"], r["git_commit"]) for r in merged["rows"]] == [(1.0, 5, "ccc")]

    # ccc changed only results: read as bbb, the runs are of one code and pool again.
    merged = build_proof.load_overhead([tmp_path / "first.json", tmp_path / "second.json"], {"ccc": "bbb"})
    assert [(r["ratio"], r["n"], r["git_commit"]) for r in merged["rows"]] == [(pytest.approx(0.97), 5, "bbb")]


def test_rebuild_keeps_the_proofs_inputs_and_adds_a_newer_run_after_them(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "old.json").write_text(
        json.dumps({"git_commit": "aaa", "rows": [_row("fast", 8, "full", 0.9, 0.8, 1.0)]})
    )
    (tmp_path / "new.json").write_text(
        json.dumps({"git_commit": "bbb", "rows": [_row("fast", 8, "full", 1.0, 0.9, 1.1)]})
    )
    arguments = ["--results-dir", str(tmp_path), "--git-commit", "ccc", "--commit-alias", "x-dirty=ddd"]
    assert build_proof.main([*arguments, "--overhead", str(tmp_path / "old.json")]) == 0
    assert (
        build_proof.main(["--results-dir", str(tmp_path), "--rebuild", "--overhead", str(tmp_path / "new.json")]) == 0
    )
    proof = json.loads((tmp_path / "proof.json").read_text())
    assert proof["built_with"] == {
        "overhead": ["old.json", "new.json"],
        "git_commit": "ccc",
        "commit_aliases": {"x-dirty": "ddd"},
    }
    assert [(r["ratio"], r["git_commit"]) for r in proof["harness_overhead"]] == [(1.0, "bbb")]


def test_targets_say_met_by_the_mean_and_conclusive_by_the_interval() -> None:
    proof = {
        "experiments": [
            {
                "experiment_id": "fast-bs8",
                "backend": "pytorch",
                "pytorch_path": "fast",
                "batch_size": 8,
                "gpu_energy_per_output_token_cv": 0.017,
            },
            {
                "experiment_id": "vllm-bs32",
                "backend": "vllm",
                "pytorch_path": None,
                "batch_size": 32,
                "gpu_energy_per_output_token_cv": 0.25,
            },
            {
                "experiment_id": "eager-bs8",
                "backend": "pytorch",
                "pytorch_path": "eager",
                "batch_size": 8,
                "gpu_energy_per_output_token_cv": 0.14,
            },  # reported as measured, no target
            {
                "experiment_id": "fast-bs1",
                "backend": "pytorch",
                "pytorch_path": "fast",
                "batch_size": 1,
                "gpu_energy_per_output_token_cv": 0.05,
            },  # batch 1: no target
        ],
        "harness_overhead_arms": [
            _row("fast", 8, "full", 1.03, 0.94, 1.13, backend="pytorch"),
            _row("fast", 128, "full", 0.97, 0.96, 0.975, backend="pytorch"),
            _row("fast", 32, "bare_streamer", 0.97, 0.96, 0.975, backend="pytorch"),  # a reference arm: no target
        ],
        "gpu_time_in_windows_share": 0.48,
        "timeline_vs_counter_max_abs_rel_diff": 0.02,
        "mbu_bs1_fast_vs_measured_bandwidth": None,
    }
    checks = build_proof.targets(proof)
    cv = {c["experiment_id"]: c["met"] for c in checks if "experiment_id" in c}
    assert cv == {"fast-bs8": True, "vllm-bs32": False}
    ratio = {c["batch_size"]: (c["met"], c["conclusive"]) for c in checks if "batch_size" in c}
    assert ratio == {8: (True, False), 128: (False, True)}
    rest = {c["target"].split()[0]: c["met"] for c in checks if "experiment_id" not in c and "batch_size" not in c}
    assert rest == {"gpu_time_in_windows_share": False, "timeline": True, "MBU": False}


def test_a_vllm_row_sits_beside_the_pytorch_rows_of_its_batch_size(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(
        json.dumps({"git_commit": "aaa", "rows": [_row("fast", 32, "full", 1.0, 0.9, 1.1)]})
    )
    vllm_row = _row(None, 32, "full", 0.99, 0.97, 1.01, backend="vllm", engine_path="default")
    (tmp_path / "vllm.json").write_text(json.dumps({"git_commit": "bbb", "rows": [vllm_row]}))
    merged = build_proof.load_overhead([tmp_path / "old.json", tmp_path / "vllm.json"])
    by_backend = {r["backend"]: (r["pytorch_path"], r["ratio"], r["git_commit"]) for r in merged["rows"]}
    assert by_backend == {"pytorch": ("fast", 1.0, "aaa"), "vllm": (None, 0.99, "bbb")}


def test_a_stale_commit_label_is_read_as_the_commit_that_ran(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "run.json").write_text(
        json.dumps({"git_commit": "old-dirty", "rows": [_row("fast", 8, "full", 1.0, 0.9, 1.1)]})
    )
    proof = build_proof.build(tmp_path, [tmp_path / "run.json"], "new", {"old-dirty": "7094582"})
    assert proof["git_commit"] == "new"
    assert [r["git_commit"] for r in proof["harness_overhead"]] == ["7094582"]


def test_each_arm_keeps_the_bare_and_harness_pace_and_older_files_read_as_unmeasured(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    paced = _row(None, 8, "full", 0.97, 0.85, 1.09, backend="vllm", engine_path="default")
    paced |= {"bare_repeat_time_cv_in_window": 0.077, "arm_repeat_time_cv_in_window": 0.065}
    (tmp_path / "old.json").write_text(json.dumps({"git_commit": "a", "rows": [_row("fast", 8, "full", 1, 0.9, 1.1)]}))
    (tmp_path / "new.json").write_text(json.dumps({"git_commit": "b", "rows": [paced]}))
    proof = build_proof.build(tmp_path, [tmp_path / "old.json", tmp_path / "new.json"])
    pace = {
        r["backend"]: (r["bare_repeat_time_cv_in_window"], r["arm_repeat_time_cv_in_window"])
        for r in proof["harness_overhead_arms"]
    }
    assert pace == {"pytorch": (None, None), "vllm": (0.077, 0.065)}


H200_TREE = REPO_ROOT / "results" / "examples" / "h200-llama1b"


def test_the_committed_h200_proof_holds_what_the_proof_names() -> None:
    proof = json.loads((H200_TREE / "proof.json").read_text())
    assert proof["gpu_name"] == "NVIDIA H200" and proof["git_commit"]
    experiment_keys = {"experiment_id", "batch_size", "pytorch_path", "cycles", "window_s_min"}
    experiment_keys |= {"gpu_energy_per_output_token_j", "gpu_energy_per_output_token_cv", "git_commit"}
    engines = set()
    for row in proof["experiments"]:
        assert experiment_keys <= row.keys(), row["experiment_id"]
        assert row["cycles"] >= 5 and row["window_s_min"] >= 3.0
        engines.add((row["backend"], row["pytorch_path"], row["batch_size"]))
    # pytorch eager, pytorch fast and vLLM, each at batch 1, 8, 32 and 128
    assert engines == {
        (b, p, n) for b, p in [("pytorch", "eager"), ("pytorch", "fast"), ("vllm", None)] for n in (1, 8, 32, 128)
    }
    for row in proof["harness_overhead"]:
        assert {"batch_size", "pytorch_path", "ratio", "ci95_low", "ci95_high", "git_commit"} <= row.keys()
        assert row["ci95_low"] <= row["ratio"] <= row["ci95_high"]
    # The full harness against the engine's own generate for both pytorch paths and vLLM at every batch size.
    overhead_engines = {(r["backend"], r["pytorch_path"], r["batch_size"]) for r in proof["harness_overhead"]}
    engines = [("pytorch", "eager"), ("pytorch", "fast"), ("vllm", None)]
    assert overhead_engines >= {(b, p, n) for b, p in engines for n in (1, 8, 32, 128)}
    assert 0 < proof["gpu_time_in_windows_share"] < 1
    assert proof["timeline_vs_counter_max_abs_rel_diff"] >= 0
    assert proof["measured_copy_bandwidth_bytes_per_s"] > 1e12


def test_the_committed_h200_fast_path_ran_as_its_default_runs_on_cuda() -> None:
    """The tree's fast-path runs are what `stop_check: auto` gives on CUDA today: the deferred check."""
    results = sorted(H200_TREE.glob("runs/*.pytorch-fast.*/cycle-*/result.json"))
    assert len(results) == 4 * 5
    for path in results:
        details = json.loads(path.read_text())["data"]["load"]["details"]
        assert (details["engine_path"], details["stop_check"]) == ("fast", "deferred"), path


def test_the_committed_h200_proof_rebuilds_unchanged_from_its_tree() -> None:
    """The proof is what build_proof reads from the committed artifacts, not a hand-edited file."""
    committed = json.loads((H200_TREE / "proof.json").read_text())
    inputs = committed["built_with"]
    rebuilt = build_proof.build(
        H200_TREE, [H200_TREE / name for name in inputs["overhead"]], inputs["git_commit"], inputs["commit_aliases"]
    )
    assert json.loads(json.dumps(rebuilt)) == committed
