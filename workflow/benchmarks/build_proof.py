"""Write proof.json for a committed results tree: the measurement targets, read from its artifacts.

Reads the tree's experiment results (results/experiments/*.json), run sets (runs/*/cycles.json, the
jobs' time accounting), every cycle's windows (timeline vs counter) and the harness-overhead
benchmark's JSON, and writes `<results-dir>/proof.json`:

- gpu_name, git_commit (of the runs' provenance), versions (torch, transformers, vllm where used);
- experiments: per experiment {experiment_id, backend, batch_size, pytorch_path ("eager"/"fast",
  null for vllm), cycles, window_s_min, gpu_energy_per_output_token_j (mean over cycles) and its
  _cv, output_tokens_per_s, mbu};
- harness_overhead: per backend, batch size and pytorch path (null for vllm), the full harness's
  throughput / the engine's own generate (transformers' generate, vLLM's LLM.generate), with its
  95 % CI and the commit of the benchmark run it came from (every arm under harness_overhead_arms;
  several benchmark JSON files may be given, say one per engine path; runs of one commit pool their
  rounds, a run at a later commit supersedes);
- gpu_time_in_windows_share: the campaign's time inside measured windows over the jobs' wall time;
- timeline_vs_counter_max_abs_rel_diff: the largest |timeline - counter| / counter of any window;
- measured_copy_bandwidth_bytes_per_s and mbu_vs_measured_bandwidth at batch 1 (fast path);
- targets: each target of the proof with the figure reached and whether it is met;
- built_with: the benchmark files (in the results dir), --git-commit and --commit-alias it was built with.

    python workflow/benchmarks/build_proof.py --results-dir results/examples/h200-llama1b \
        --overhead results/examples/h200-llama1b/harness_overhead_eager_883a7c4.json \
        results/examples/h200-llama1b/harness_overhead_fast.json

    # the same inputs again, plus a newer benchmark run:
    python workflow/benchmarks/build_proof.py --results-dir results/examples/h200-llama1b --rebuild \
        --overhead results/examples/h200-llama1b/harness_overhead_new.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "workflow"))

CV_TARGET = 0.02
RATIO_TARGET = 0.98
SHARE_TARGET = 0.70
TIMELINE_TARGET = 0.03
MBU_TARGET = 0.25
PACE_KEYS = ("bare_repeat_time_cv_in_window", "arm_repeat_time_cv_in_window")
ROUND_LISTS = ("ratios", "arm_window_output_tokens_per_s", "bare_window_output_tokens_per_s")  # one value a round
HOST_CPU_LISTS = ("arm_window_host_cpu", "bare_window_host_cpu")  # one a round, in files since host_cpu came


def _mean(metric: dict | None) -> float | None:
    return (metric or {}).get("mean")


def experiment_rows(results_dir: Path) -> tuple[list[dict], dict[str, Any]]:
    from llm_energy import artifacts

    rows, facts = [], {}
    for path in sorted((results_dir / "experiments").glob("*.json")):
        document = artifacts.read_json_artifact(path, "experiment_result")
        data = document["data"]
        experiment = data.get("experiment") or {}
        metrics = data.get("metrics") or {}
        backend = experiment.get("backend")
        energy = metrics.get("gpu_energy_per_output_token_j") or {}
        rows.append(
            {
                "experiment_id": data["experiment_id"],
                "backend": backend,
                "batch_size": experiment.get("parameters", {}).get("batch_size"),
                "pytorch_path": experiment.get("engine_path") if backend == "pytorch" else None,
                "cycles": data.get("cycles_ok"),
                "window_s_min": (metrics.get("window_duration_s") or {}).get("min"),
                "gpu_energy_per_output_token_j": energy.get("mean"),
                "gpu_energy_per_output_token_cv": energy.get("cv"),
                "output_tokens_per_s": _mean(metrics.get("output_tokens_per_s")),
                "gpu_mean_power_w": _mean(metrics.get("gpu_mean_power_w")),
                "mbu": _mean(metrics.get("mbu")),
                "flags": sorted(data.get("flags") or []),
            }
        )
        facts.setdefault("gpu_name", data.get("gpu_name"))
        # Versions and code of the machine that measured: a measured cycle's provenance (the experiment
        # result may have been aggregated elsewhere).
        run_sets = sorted((results_dir / "runs").glob(f"{data['experiment_id']}/cycles.json"))
        for run_set in run_sets:
            first = artifacts.read_json_artifact(run_set, "run_set")["data"]["cycles"][0]
            measured = artifacts.read_json_artifact(run_set.parent / first["result"], "run_result")
            provenance = measured.get("provenance") or {}
            software = provenance.get("software") or {}
            commit = (provenance.get("code") or {}).get("git_commit")
            rows[-1]["git_commit"] = commit  # a tree re-measured in parts holds runs of several commits
            facts.setdefault("git_commit", commit)
            for name in ("torch", "transformers", "vllm", "python"):
                if software.get(name) and (name != "vllm" or backend == "vllm"):
                    facts.setdefault("versions", {})[name] = software[name]
    return rows, facts


def window_facts(results_dir: Path) -> dict[str, Any]:
    """The campaign's share of job time inside windows, and the worst timeline-vs-counter gap."""
    from llm_energy import artifacts

    total_s = windows_s = 0.0
    worst = None
    for run_set in sorted((results_dir / "runs").glob("*/cycles.json")):
        data = artifacts.read_json_artifact(run_set, "run_set")["data"]
        total_s += data["timing"]["total_s"]
        windows_s += data["timing"]["windows_s"]
        for entry in data["cycles"]:
            result = artifacts.read_json_artifact(run_set.parent / entry["result"], "run_result")["data"]
            window = result.get("window")
            if window:
                diff = ((window.get("domains") or {}).get("gpu") or {}).get("timeline_vs_counter_rel_diff")
                if diff is not None and (worst is None or abs(diff) > worst):
                    worst = abs(diff)
    return {
        "gpu_time_in_windows_share": windows_s / total_s if total_s else None,
        "jobs_wall_s": total_s,
        "jobs_windows_s": windows_s,
        "timeline_vs_counter_max_abs_rel_diff": worst,
    }


def load_overhead(paths: Sequence[Path], commit_aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """harness_overhead.py outputs, possibly from several runs (say one per engine path, or a longer
    rerun of some batch sizes): their rows, each tagged with the commit of the run it came from, and the
    first copy bandwidth measured. List the files oldest first. For one engine path, batch size and arm,
    a run at another commit replaces what earlier runs measured (the code changed), while runs at the
    same commit pool their rounds (`pool_rows`): a second run of the same code is more evidence, so the
    figure is never whichever run happened to come last. A run's commit is read through
    `commit_aliases` first, so two commits whose measuring code is the same pool (one added only
    results, or changed only what never runs in a measured process: plots, this script)."""
    aliases = commit_aliases or {}
    rows: dict[tuple, dict[str, Any]] = {}
    bandwidth = None
    for path in paths:
        run = json.loads(path.read_text())
        for r in run.get("rows", []):
            backend = r.get("backend", "pytorch")  # files before vLLM's bare arm hold pytorch rows only
            key = (backend, r["pytorch_path"], r["batch_size"], r["arm"])
            commit = aliases.get(run.get("git_commit"), run.get("git_commit"))
            row = {**r, "backend": backend, "git_commit": commit, "source": path.name}
            earlier = rows.get(key)
            if earlier is not None and earlier["git_commit"] == row["git_commit"]:
                row = pool_rows(earlier, row)
            rows[key] = row
        bandwidth = bandwidth or run.get("measured_copy_bandwidth_bytes_per_s")
    return {"rows": list(rows.values()), "measured_copy_bandwidth_bytes_per_s": bandwidth}


def pool_rows(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One row from two runs' rows of the same code, engine path, batch size and arm: the ratio and its
    95 % CI over all their rounds, the throughputs over all their windows, and the per-run means
    (energy per token, pace CV) weighted by each run's rounds."""
    from llm_energy import statistics

    if any(key not in row for key in ROUND_LISTS for row in (earlier, later)):
        return later  # a file from before the rounds were kept: nothing to pool, the later row stands
    ratios = earlier["ratios"] + later["ratios"]
    stats = statistics.describe(ratios)
    pooled = {
        **later,
        "ratio": stats["mean"],
        "ci95_low": stats["ci95_low"],
        "ci95_high": stats["ci95_high"],
        "n": stats["n"],
        "ratios": ratios,
        "source": f"{earlier['source']} + {later['source']}",
    }
    for key in HOST_CPU_LISTS:  # pooled only where both runs have them: never a list shorter than n
        if key in earlier and key in later:
            pooled[key] = earlier[key] + later[key]
        else:
            pooled.pop(key, None)
    for arm in ("arm", "bare"):
        windows = earlier[f"{arm}_window_output_tokens_per_s"] + later[f"{arm}_window_output_tokens_per_s"]
        pooled[f"{arm}_window_output_tokens_per_s"] = windows
        pooled[f"{arm}_output_tokens_per_s"] = statistics.describe(windows)["mean"]
    for key in ("arm_gpu_energy_per_output_token_j", *PACE_KEYS):
        weighted = [(r[key], len(r["ratios"])) for r in (earlier, later) if r.get(key) is not None]
        total = sum(n for _, n in weighted)
        pooled[key] = sum(value * n for value, n in weighted) / total if total else None
    return pooled


def build(
    results_dir: Path,
    overhead_paths: Sequence[Path] = (),
    git_commit: str | None = None,
    commit_aliases: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`commit_aliases` maps a commit label found in artifacts to the commit whose code really ran: a
    wrong label (a copy of the tree with a stale .git labelled its runs with an older commit and
    -dirty), or a commit that changed only results or code outside the measured process (plots, this
    script), so that runs of the same measuring code pool."""
    aliases = dict(commit_aliases or {})
    rows, facts = experiment_rows(results_dir)
    for row in rows:
        row["git_commit"] = aliases.get(row.get("git_commit"), row.get("git_commit"))
    proof: dict[str, Any] = {
        "gpu_name": facts.get("gpu_name"),
        "git_commit": git_commit or facts.get("git_commit"),
        "git_commit_in_artifacts": facts.get("git_commit"),
        "versions": facts.get("versions", {}),
        "experiments": rows,
        # What this proof was built from, so that tests/unit/test_build_proof.py can rebuild it from the
        # committed tree and find it unchanged (the benchmark files lie in the results dir).
        "built_with": {
            "overhead": [Path(path).name for path in overhead_paths],
            "git_commit": git_commit,
            "commit_aliases": aliases,
        },
    }
    overhead = load_overhead(overhead_paths, aliases)
    keys = ("backend", "batch_size", "pytorch_path", "ratio", "ci95_low", "ci95_high")
    proof["harness_overhead"] = [
        {k: r[k] for k in (*keys, "git_commit")} for r in overhead["rows"] if r["arm"] == "full"
    ]
    arm_keys = (*keys, "arm", "n", "bare_output_tokens_per_s", "arm_output_tokens_per_s", "git_commit", "source")
    proof["harness_overhead_arms"] = [
        {
            **{k: r[k] for k in arm_keys},
            # Each arm's pace inside its windows, bare and harness alike (None in files that predate it):
            # a spread the bare engine shows too is the engine's, not the harness's.
            **{k: r.get(k) for k in PACE_KEYS},
        }
        for r in overhead["rows"]
    ]
    proof.update(window_facts(results_dir))
    bandwidth = overhead["measured_copy_bandwidth_bytes_per_s"]
    proof["measured_copy_bandwidth_bytes_per_s"] = bandwidth
    fast_bs1 = [r for r in rows if r["pytorch_path"] == "fast" and r["batch_size"] == 1]
    if fast_bs1 and bandwidth and fast_bs1[0]["mbu"] is not None:
        from llm_energy.flops import peak_figures

        peak = peak_figures(proof["gpu_name"], "bfloat16")
        peak_bytes = (peak or {}).get("memory_bytes_per_s")
        proof["mbu_bs1_fast_vs_measured_bandwidth"] = (
            fast_bs1[0]["mbu"] * peak_bytes / bandwidth if peak_bytes else None
        )
    proof["targets"] = targets(proof)
    return proof


def targets(proof: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for r in proof["experiments"]:
        if (r["pytorch_path"] == "fast" or r["backend"] == "vllm") and (r["batch_size"] or 0) >= 8:
            cv = r["gpu_energy_per_output_token_cv"]
            checks.append(
                {
                    "target": f"cv <= {CV_TARGET}",
                    "experiment_id": r["experiment_id"],
                    "value": cv,
                    "met": cv is not None and cv <= CV_TARGET,
                }
            )
    for r in proof["harness_overhead_arms"]:
        if r["arm"] == "bare_streamer":
            continue  # a second reference, not the harness: it prices transformers' per-step streamer copy
        # The mean decides "met"; "conclusive" says whether the 95 % CI lies on one side of the target.
        low, high = r["ci95_low"], r["ci95_high"]
        checks.append(
            {
                "target": f"{r['arm']} harness / bare >= {RATIO_TARGET}",
                "backend": r["backend"],
                "batch_size": r["batch_size"],
                "pytorch_path": r["pytorch_path"],
                "value": r["ratio"],
                "ci95_low": low,
                "ci95_high": high,
                "met": r["ratio"] is not None and r["ratio"] >= RATIO_TARGET,
                "conclusive": low is not None and (low >= RATIO_TARGET or high < RATIO_TARGET),
            }
        )
    share = proof["gpu_time_in_windows_share"]
    checks.append(
        {
            "target": f"gpu_time_in_windows_share >= {SHARE_TARGET}",
            "value": share,
            "met": share is not None and share >= SHARE_TARGET,
        }
    )
    diff = proof["timeline_vs_counter_max_abs_rel_diff"]
    checks.append(
        {
            "target": f"timeline within {TIMELINE_TARGET} of the counter",
            "value": diff,
            "met": diff is not None and diff <= TIMELINE_TARGET,
        }
    )
    mbu = proof.get("mbu_bs1_fast_vs_measured_bandwidth")
    checks.append(
        {
            "target": f"MBU at batch 1 (fast) >= {MBU_TARGET} of the measured copy bandwidth",
            "value": mbu,
            "met": mbu is not None and mbu >= MBU_TARGET,
        }
    )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument(
        "--overhead",
        type=Path,
        nargs="*",
        default=[],
        help="harness_overhead.py's --out JSON files, oldest first (rows keep their run's commit; "
        "runs of one commit pool their rounds, a later commit's row replaces an earlier one for the "
        "same path, batch and arm)",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="start from the results dir's proof.json: its benchmark files, --git-commit and "
        "--commit-alias (its built_with); --overhead files given too come after them, as newer runs",
    )
    parser.add_argument(
        "--git-commit",
        help="the commit whose tree ran, where the artifacts' own is wrong (a "
        "copy of the tree whose .git was stale; LLM_ENERGY_GIT_COMMIT avoids it)",
    )
    parser.add_argument(
        "--commit-alias",
        action="append",
        default=[],
        metavar="LABEL=COMMIT",
        help="read the commit LABEL found in artifacts as COMMIT, whose measuring code ran (a stale label, "
        "or a commit that changed only results, plots or this script; repeatable)",
    )
    args = parser.parse_args(argv)
    overhead, git_commit, aliases = list(args.overhead), args.git_commit, {}
    if args.rebuild:
        proof_path = args.results_dir / "proof.json"
        if not proof_path.is_file():
            parser.error(f"--rebuild: {proof_path} does not exist; build it once with --overhead")
        built_with = json.loads(proof_path.read_text())["built_with"]
        earlier = [args.results_dir / name for name in built_with["overhead"]]
        overhead = earlier + [path for path in overhead if path.name not in built_with["overhead"]]
        git_commit = git_commit or built_with["git_commit"]
        aliases = dict(built_with["commit_aliases"])
    for alias in args.commit_alias:
        label, sep, commit = alias.partition("=")
        if not sep or not label or not commit:
            parser.error(f"--commit-alias {alias!r}: expected LABEL=COMMIT")
        aliases[label] = commit
    proof = build(args.results_dir, overhead, git_commit, aliases)
    (args.results_dir / "proof.json").write_text(json.dumps(proof, indent=2) + "\n")
    for check in proof["targets"]:
        value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        where = check.get("experiment_id") or " ".join(
            f"{k}={check[k]}" for k in ("backend", "pytorch_path", "batch_size") if k in check
        )
        ci = f" (95 % CI {check['ci95_low']:.3f}-{check['ci95_high']:.3f})" if check.get("ci95_low") is not None else ""
        print(f"{'met   ' if check['met'] else 'MISSED'} {check['target']:55} {value:>8} {where}{ci}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
