"""How the workflow scales: `snakemake -n` on a campaign of N experiments, and figures-only mode over N
experiment results, both with the real snakemake.

    python workflow/benchmarks/dag_scale.py                      # 1,000 experiments, 3 cycles, --cores 2
    python workflow/benchmarks/dag_scale.py --experiments 100 --keep /tmp/scale
    python workflow/benchmarks/dag_scale.py --timelines          # also time what `all` adds

1. Writes a campaign of N experiments (2 built-in models x batch sizes x 10 output lengths, `cycles`
   cycles each) and times `snakemake -n` on it: parsing, config expansion and the DAG of every job.
2. Synthesises N experiment results (`llm_energy.synthetic`: valid experiments/ and runs/ with timelines
   and per-request tables; not timed) and times figures-only mode on them, target `figures`: the
   summary and metrics tables, every campaign figure and the report pages (with --timelines, then
   what `all` adds: one power timeline per experiment).
3. Times snakemake's own start on this machine (a one-rule Snakefile, dry run): the part of both
   times that no workflow can change. Where the SLURM client tools are installed but no controller
   answers, snakemake's SLURM executor plugin waits about 9 s at start for `scontrol show config`.

Targets on 2 cores: `snakemake -n` at most 15 s, figures-only at most 60 s, for 1,000 experiments.
Prints each time, each job's own time from its log, and a JSON report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))

from llm_energy import synthetic  # noqa: E402

DRY_RUN_TARGET_S = 15.0
FIGURES_TARGET_S = 60.0
OUTPUT_LENGTHS = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80)
MODELS = {
    "tiny-llama": {"source": "builtin", "architecture": "llama", "seed": 0},
    "tiny-gpt2": {"source": "builtin", "architecture": "gpt2", "seed": 0},
}


def campaign(experiments: int, cycles: int) -> dict:
    """A campaign of about `experiments` experiments: 2 models x batch sizes x 10 output lengths."""
    batch_sizes = list(range(1, math.ceil(experiments / (len(MODELS) * len(OUTPUT_LENGTHS))) + 1))
    return {
        "campaign": {"name": "dag-scale", "cycles": cycles, "min_window_s": 0.5, "seed": 1},
        "models": MODELS,
        "datasets": {"bundled": {"source": "bundled", "sample_size": 8, "seed": 0}},
        "backends": ["pytorch"],
        "grid": {
            "batch_size": batch_sizes,
            "dtype": ["float32"],
            "max_input_tokens": [128],
            "max_output_tokens": list(OUTPUT_LENGTHS),
            "decoding": [{"mode": "greedy"}],
            "output_length": ["fixed"],
            "batching": ["fixed"],
        },
        "backend_settings": {"pytorch": {"device": "cpu"}},
    }


class Snakemake:
    """The real snakemake of this interpreter's environment, on the repository's Snakefile."""

    def __init__(self, workdir: Path, cores: int) -> None:
        found = Path(sys.executable).with_name("snakemake")
        self.command = [str(found) if found.exists() else "snakemake"]
        self.workdir = workdir
        self.cores = cores
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "workflow"), os.environ.get("PYTHONPATH")])),
        }

    def timed(self, *args: str, snakefile: Path = REPO / "Snakefile") -> tuple[float, str]:
        """(wall seconds, stdout) of one snakemake run; stops the benchmark if it fails."""
        command = [
            *self.command,
            "-s",
            str(snakefile),
            "-d",
            str(self.workdir),
            "--cores",
            str(self.cores),
            "--quiet",
            "rules",
            *args,
        ]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=self.workdir, env=self.env, capture_output=True, text=True)
        wall_s = time.perf_counter() - started
        if completed.returncode != 0:
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"snakemake {' '.join(args)} failed ({completed.returncode})")
        return wall_s, completed.stdout


def dry_run(workdir: Path, experiments: int, cycles: int, snakemake: Snakemake) -> dict:
    config = workdir / "campaign.yaml"
    config.write_text(yaml.safe_dump(campaign(experiments, cycles), sort_keys=False))
    wall_s, out = snakemake.timed("--configfile", str(config), "-n")
    jobs = re.search(r"^run_inference\s+(\d+)$", out, re.MULTILINE)
    total = re.search(r"^total\s+(\d+)$", out, re.MULTILINE)
    return {
        "wall_s": round(wall_s, 1),
        "experiments": int(jobs.group(1)) if jobs else None,
        "jobs": int(total.group(1)) if total else None,
        "target_s": DRY_RUN_TARGET_S,
        "within_target": wall_s <= DRY_RUN_TARGET_S,
    }


def figures_only(
    workdir: Path, experiments: int, cycles: int, snakemake: Snakemake, timelines: bool, reuse: bool
) -> dict:
    tree = workdir / "tree"
    started = time.perf_counter()
    if reuse and (tree / "experiments").is_dir():
        ids = sorted(p.stem for p in (tree / "experiments").glob("*.json"))
        print(f"reusing the {len(ids)} synthetic experiments in {tree}", flush=True)
    else:
        ids = synthetic.write_tree(tree, experiments, cycles=cycles)
    for derived in ("figures", "logs", "report"):
        shutil.rmtree(tree / derived, ignore_errors=True)
    print(
        f"synthesised {len(ids)} experiments x {cycles} cycles in {time.perf_counter() - started:.1f} s (not timed)",
        flush=True,
    )
    options = ("--config", "figures_only=true", "results_dir=tree")
    figures_s, _ = snakemake.timed(*options, "--forceall", "figures")
    report = {
        "wall_s": round(figures_s, 1),
        "experiments": len(ids),
        "target_s": FIGURES_TARGET_S,
        "within_target": figures_s <= FIGURES_TARGET_S,
        "campaign_figures": sorted(p.name for p in (tree / "figures").glob("*.png")),
    }
    if timelines:
        timelines_s, _ = snakemake.timed(*options)
        report.update(
            timelines_wall_s=round(timelines_s, 1),
            timeline_figures=len(list((tree / "figures" / "timelines").glob("*.png"))),
        )
    report["jobs_s"] = job_times(tree / "logs")
    return report


def snakemake_start(workdir: Path, snakemake: Snakemake) -> float:
    """Wall time of a dry run of a one-rule Snakefile: snakemake's own start on this machine."""
    snakefile = workdir / "Snakefile.start"
    snakefile.write_text("rule nothing:\n    output: 'nothing.txt'\n    shell: 'touch {output}'\n")
    wall_s, _ = snakemake.timed("-n", snakefile=snakefile)
    return round(wall_s, 1)


def job_times(logs: Path) -> dict[str, float]:
    """Each job's duration from the first and last timestamp of its log (llm_energy.logs format)."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+)")

    def parse(text: str) -> datetime:
        return datetime.strptime(text.replace(",", "."), "%Y-%m-%d %H:%M:%S.%f")

    times = {}
    for log in sorted(logs.rglob("*.log")):
        lines = [m.group(1) for m in map(stamp.match, log.read_text(errors="replace").splitlines()) if m]
        if len(lines) >= 2:
            times[str(log.relative_to(logs))] = round((parse(lines[-1]) - parse(lines[0])).total_seconds(), 1)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--timelines", action="store_true", help="also time the per-experiment timelines (all)")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir, removed)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: reuse the synthetic results there")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="llm-energy-dag-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    snakemake = Snakemake(workdir, args.cores)
    try:
        start_s = snakemake_start(workdir, snakemake)
        print(f"snakemake's own start (one-rule Snakefile, dry run): {start_s:.1f} s", flush=True)
        dry = dry_run(workdir, args.experiments, args.cycles, snakemake)
        print(
            f"snakemake -n, {dry['experiments']} experiments x {args.cycles} cycles ({dry['jobs']} jobs): "
            f"{dry['wall_s']:.1f} s",
            flush=True,
        )
        figures = figures_only(
            workdir,
            args.experiments,
            args.cycles,
            snakemake,
            args.timelines,
            reuse=args.reuse and args.keep is not None,
        )
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "cores": args.cores,
        "cycles": args.cycles,
        "snakemake_start_s": start_s,
        "dry_run": dry,
        "figures_only": figures,
    }
    print(json.dumps(report, indent=1))
    verdict = {True: "met", False: "missed"}
    print(
        f"{args.cores} cores: snakemake -n on {dry['experiments']} experiments x {args.cycles} cycles "
        f"{dry['wall_s']:.1f} s (target {DRY_RUN_TARGET_S:.0f} s: {verdict[dry['within_target']]}); "
        f"figures-only over {figures['experiments']} experiment results {figures['wall_s']:.1f} s "
        f"(target {FIGURES_TARGET_S:.0f} s: {verdict[figures['within_target']]}); "
        f"snakemake's own start {start_s:.1f} s of each"
        + (
            f"; + {figures['timeline_figures']} per-experiment timelines {figures['timelines_wall_s']:.1f} s"
            if args.timelines
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
