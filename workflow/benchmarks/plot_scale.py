"""How long figures-only mode takes for a large campaign: synthesise N experiment results (valid
artifacts: experiments/ and runs/ with timelines and per-request tables, llm_energy.synthetic), then
time the real snakemake regenerating the summary, every figure and the report pages from them.

    python workflow/benchmarks/plot_scale.py                  # 1,000 experiments, --cores 2
    python workflow/benchmarks/plot_scale.py --experiments 100 --keep /tmp/tree

The target is 60 s on 2 cores for 1,000 experiments. Prints the synthesis time (not counted), the wall
time of the `figures` target (summary, every campaign figure, the report pages), then of what `all` adds
(one power timeline figure per experiment), and each job's own time from its log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))

from llm_energy import synthetic  # noqa: E402

TARGET_S = 60.0


def run(experiments: int, cores: int, workdir: Path, cycles: int, reuse: bool = False) -> dict:
    tree = workdir / "tree"
    started = time.perf_counter()
    if reuse and (tree / "experiments").is_dir():
        ids = sorted(p.stem for p in (tree / "experiments").glob("*.json"))
        shutil.rmtree(tree / "figures", ignore_errors=True)
        shutil.rmtree(tree / "logs", ignore_errors=True)
        print(f"reusing the {len(ids)} synthetic experiments in {tree}", flush=True)
    else:
        ids = synthetic.write_tree(tree, experiments, cycles=cycles)
    synthesis_s = time.perf_counter() - started
    print(f"synthesised {len(ids)} experiments x {cycles} cycles in {synthesis_s:.1f} s (not timed)", flush=True)
    snakemake = Path(sys.executable).with_name("snakemake")
    base = [str(snakemake) if snakemake.exists() else "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--cores", str(cores), "--config", "figures_only=true", "results_dir=tree", "--quiet", "rules"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "workflow"),
                                                                        os.environ.get("PYTHONPATH")]))}

    def timed(*args: str) -> float:
        started = time.perf_counter()
        completed = subprocess.run([*base, *args], cwd=workdir, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"figures-only snakemake failed ({completed.returncode})")
        return time.perf_counter() - started

    # The summary, every campaign figure and the report pages (target `figures`), then what `all` adds:
    # one power timeline per experiment.
    figures_s = timed("--forceall", "figures")
    print(f"summary, campaign figures and report pages: {figures_s:.1f} s", flush=True)
    timelines_s = timed()
    figures = sorted(p.name for p in (tree / "figures").glob("*.png"))
    timelines = len(list((tree / "figures" / "timelines").glob("*.png")))
    return {"experiments": len(ids), "cycles": cycles, "cores": cores, "synthesis_s": round(synthesis_s, 1),
            "figures_target_wall_s": round(figures_s, 1), "timelines_wall_s": round(timelines_s, 1),
            "all_wall_s": round(figures_s + timelines_s, 1), "target_s": TARGET_S,
            "figures_within_target": figures_s <= TARGET_S, "campaign_figures": figures,
            "timeline_figures": timelines, "jobs_s": job_times(tree / "logs")}


def job_times(logs: Path) -> dict[str, float]:
    """Each job's duration from the first and last timestamp of its log (llm_energy.logs format)."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+)")
    times = {}
    for log in sorted(logs.rglob("*.log")):
        lines = [m.group(1) for m in map(stamp.match, log.read_text(errors="replace").splitlines()) if m]
        if len(lines) >= 2:
            from datetime import datetime

            parse = lambda s: datetime.strptime(s.replace(",", "."), "%Y-%m-%d %H:%M:%S.%f")  # noqa: E731
            times[str(log.relative_to(logs))] = round((parse(lines[-1]) - parse(lines[0])).total_seconds(), 1)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the tree here and keep it (default: a temp dir, removed)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: time the tree already there again")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="llm-energy-plot-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args.experiments, args.cores, workdir, args.cycles, reuse=args.reuse and args.keep is not None)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=1))
    print(f"figures-only mode, {report['experiments']} experiments, {args.cores} cores: summary + campaign "
          f"figures + report pages {report['figures_target_wall_s']:.1f} s (target {TARGET_S:.0f} s: "
          f"{'met' if report['figures_within_target'] else 'missed'}); + {report['timeline_figures']} per-experiment "
          f"timelines {report['timelines_wall_s']:.1f} s; everything {report['all_wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
