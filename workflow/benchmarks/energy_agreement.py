"""Check the pipeline's GPU energy against an independent NVML counter log, on a real GPU.

Runs a campaign with the real snakemake while a separate thread of this process (not the pipeline's
code: raw nvidia-ml-py) reads the GPU's total-energy counter back to back. For every measured window
of every run, the independent energy is the difference of the logged counter at the window's two
edges. The pipeline aligns each edge on a counter tick, so the independent log is read at the logged
tick nearest each edge (the time offset between the two is reported: a few ms means both read the
same counter state). Also reported per run: the pipeline's own timeline-vs-counter agreement, and per
experiment the cross-cycle coefficient of variation of GPU energy per output token.

    python workflow/benchmarks/energy_agreement.py \
        --configfile config/campaigns/h100-llama1b-energy.yaml \
        --results-dir results/examples/h100-llama1b-energy --cores 4

Exit status 1 when any window disagrees by more than --tolerance (default 0.5 %).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "workflow"))


class CounterLog:
    """Back-to-back reads of one GPU's NVML total-energy counter: (read start, read end, mJ)."""

    def __init__(self, gpu_index: int):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        self.uuid = pynvml.nvmlDeviceGetUUID(self.handle)
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="independent-nvml-counter", daemon=True)

    def _run(self) -> None:
        read = self.nvml.nvmlDeviceGetTotalEnergyConsumption
        while not self._stop.is_set():
            before = time.time()
            value = read(self.handle)
            self.samples.append((before, time.time(), value))

    def __enter__(self) -> CounterLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def ticks(self) -> list[tuple[float, int]]:
        """(time of tick, counter after tick): midpoint of the first read that saw a new value."""
        out = []
        for (_, _, old), (start, end, new) in zip(self.samples, self.samples[1:]):
            if new != old:
                out.append(((start + end) / 2, new))
        return out


def counter_at_edge(ticks: list[tuple[float, int]], times: list[float], edge_unix_s: float) -> tuple[int, float]:
    """Counter value after the tick nearest `edge_unix_s`, and the offset of that tick (s)."""
    i = bisect.bisect_left(times, edge_unix_s)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(ticks)]
    best = min(candidates, key=lambda j: abs(times[j] - edge_unix_s))
    return ticks[best][1], times[best] - edge_unix_s


def windows_of(result: dict) -> list[dict]:
    data = result["data"]
    windows = list(data["setup"]["windows"])
    if data.get("window"):
        windows.append(data["window"])
    return windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", required=True)
    parser.add_argument("--results-dir", required=True)
    parser.add_argument("--cores", default="4")
    parser.add_argument("--gpu-index", type=int, default=int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
    parser.add_argument("--tolerance", type=float, default=0.005)
    args = parser.parse_args()

    from llm_energy import artifacts

    results_dir = REPO_ROOT / args.results_dir
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        args.cores,
        "--configfile",
        args.configfile,
        "--config",
        f"results_dir={args.results_dir}",
    ]
    print("running:", " ".join(command), flush=True)
    with CounterLog(args.gpu_index) as log:
        started = time.time()
        completed = subprocess.run(command, cwd=REPO_ROOT)
        elapsed = time.time() - started
    print(
        f"snakemake exit {completed.returncode} after {elapsed:.0f} s; independent counter reads: "
        f"{len(log.samples)} ({len(log.samples) / max(elapsed, 1e-9):.0f}/s)",
        flush=True,
    )
    ticks = log.ticks()
    tick_times = [t for t, _ in ticks]

    rows = []
    for path in sorted(results_dir.glob("runs/*/cycle-*/result.json")):
        result = artifacts.read_json_artifact(path, "run_result")
        offset = (
            result["data"]["window"]["start_unix_s"] - result["data"]["window"]["start_s"]
            if result["data"].get("window")
            else None
        )
        if offset is None:
            continue
        for window in windows_of(result):
            gpu = window["domains"]["gpu"]
            if not gpu.get("available"):
                continue
            start_mj, start_dt = counter_at_edge(ticks, tick_times, window["start_s"] + offset)
            end_mj, end_dt = counter_at_edge(ticks, tick_times, window["end_s"] + offset)
            independent_j = (end_mj - start_mj) / 1000.0
            rows.append(
                {
                    "experiment": result["data"]["experiment_id"],
                    "cycle": result["data"]["cycle"],
                    "window": window["name"],
                    "duration_s": window["duration_s"],
                    "pipeline_gpu_j": gpu["gross_j"],
                    "independent_gpu_j": independent_j,
                    "rel_diff": (gpu["gross_j"] - independent_j) / independent_j if independent_j else None,
                    "edge_offsets_ms": [round(start_dt * 1000, 2), round(end_dt * 1000, 2)],
                    "timeline_vs_counter_rel_diff": gpu.get("timeline_vs_counter_rel_diff"),
                    "flags": window.get("flags", []),
                }
            )
    from llm_energy.summary import TablePaths

    # every metric's cv (the summary has the headline CIs only)
    metrics_path = TablePaths.in_dir(results_dir).metrics_csv
    cv = {}
    if metrics_path.is_file():
        import pandas as pd

        metrics = pd.read_csv(metrics_path)
        per_token = metrics.loc[metrics["metric"] == "gpu_energy_per_output_token_j"]
        cv = dict(zip(per_token["experiment_id"], per_token["cv"]))
    inference = [r for r in rows if r["window"] == "inference"]
    worst = max((abs(r["rel_diff"]) for r in rows if r["rel_diff"] is not None), default=None)
    report = {
        "gpu_uuid": log.uuid,
        "tolerance": args.tolerance,
        "snakemake_exit": completed.returncode,
        "independent_reads": len(log.samples),
        "windows_checked": len(rows),
        "max_abs_rel_diff": worst,
        "max_abs_timeline_vs_counter_rel_diff": max(
            (
                abs(r["timeline_vs_counter_rel_diff"])
                for r in inference
                if r["timeline_vs_counter_rel_diff"] is not None
            ),
            default=None,
        ),
        "gpu_energy_per_output_token_cv": cv,
        "windows": rows,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "energy_agreement.json").write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\n{'experiment':<70} {'cyc':>3} {'window':<10} {'s':>6} {'pipeline J':>11} {'independent J':>13} "
        f"{'diff %':>8} {'timeline %':>10}"
    )
    for r in rows:
        tl = r["timeline_vs_counter_rel_diff"]
        print(
            f"{r['experiment']:<70} {r['cycle']:>3} {r['window']:<10} {r['duration_s']:>6.2f} {r['pipeline_gpu_j']:>11.2f} "
            f"{r['independent_gpu_j']:>13.2f} {100 * r['rel_diff']:>8.4f} {'' if tl is None else f'{100 * tl:.2f}':>10}"
        )
    for eid, value in cv.items():
        print(f"CV of GPU energy per output token over cycles, {eid}: {value:.4f}")
    print(
        f"\nwindows checked: {len(rows)}; max |pipeline - independent| / independent = "
        f"{'n/a' if worst is None else f'{100 * worst:.4f} %'} (tolerance {100 * args.tolerance:.2f} %)"
    )
    ok = completed.returncode == 0 and rows and worst is not None and worst <= args.tolerance
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
