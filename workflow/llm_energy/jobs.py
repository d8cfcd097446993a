"""One function per workflow rule: plain arguments in, artifacts out.

The Snakemake scripts only unpack `snakemake` and call these, so every rule's logic is importable
and testable without Snakemake (and a change here does not make Snakemake rerun finished jobs).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_energy import artifacts, provenance

log = logging.getLogger(__name__)


def config_sha256(config: Mapping[str, Any]) -> str | None:
    """Hash of the validated campaign config (equals llm_energy.config.Campaign.sha256). None in
    figures-only mode: the archived experiments carry the hash of the campaign that produced them."""
    if config.get("figures_only"):
        return None
    return artifacts.sha256_json(dict(config))


def prepare_dataset_job(
    name: str, spec: Mapping[str, Any], out_dir: Path, tokenizer_manifest: Path | None, config_sha256: str
) -> dict:
    from llm_energy import datasets, models

    tokenizer_dir = models.resolve_model_path(tokenizer_manifest) if tokenizer_manifest else None
    inputs = [tokenizer_manifest] if tokenizer_manifest else []
    prov = provenance.collect(config_sha256=config_sha256, inputs=inputs, include_gpus=False)
    return datasets.prepare_dataset(name, dict(spec), Path(out_dir), tokenizer_dir=tokenizer_dir, provenance=prov)


def prepare_model_job(name: str, spec: Mapping[str, Any], out_dir: Path, config_sha256: str) -> dict:
    from llm_energy import models

    prov = provenance.collect(config_sha256=config_sha256, include_gpus=False)
    return models.prepare_model(name, dict(spec), Path(out_dir), provenance=prov)


def baseline_cache_path(resources_dir: Path | str = "resources") -> Path:
    """Idle baselines are per node: a cluster's nodes each keep their own."""
    return Path(resources_dir) / "baseline" / f"{socket.gethostname()}.json"


def compile_cache_dir(resources_dir: Path | str = "resources") -> Path:
    """torch.compile / Triton caches, per node (they depend on the GPU and the software): cycles and
    reruns on this node reuse them instead of compiling again."""
    return Path(resources_dir) / "compile-cache" / socket.gethostname()


def experiment_run(
    experiment_id: str,
    config: Mapping[str, Any],
    model_manifest: Path,
    dataset_dir: Path,
    experiment_dir: Path,
    baseline_path: Path | None = None,
    compile_cache: Path | None = None,
    placement: Mapping[str, Any] | None = None,
    campaign: Any = None,
):
    """Everything measure.measure_experiment needs, from the job's arguments (`campaign`: the config
    already loaded, where the caller has it; an isolated cycle's process loads it itself)."""
    from llm_energy import datasets, measure, models
    from llm_energy.config import load_campaign

    campaign = campaign or load_campaign(config)
    exp = campaign.experiments[experiment_id]
    prov = provenance.collect(
        experiment=exp.id,
        config_sha256=campaign.sha256,
        inputs=[Path(model_manifest), Path(dataset_dir) / "manifest.json", Path(dataset_dir) / "prompts.jsonl"],
        extra={"job": measure.job_provenance()},
    )
    return measure.ExperimentRun(
        experiment=exp,
        model_dir=models.resolve_model_path(Path(model_manifest)),
        prompts=[p["prompt"] for p in datasets.load_prompts(Path(dataset_dir))],
        energy_config=dict(campaign.config["energy"]),
        experiment_dir=Path(experiment_dir),
        provenance=prov,
        baseline_path=Path(baseline_path) if baseline_path else None,
        compile_cache_dir=Path(compile_cache) if compile_cache else None,
        placement=dict(placement) if placement else None,
    ), campaign


def run_inference_job(
    experiment_id: str,
    config: Mapping[str, Any],
    model_manifest: Path,
    dataset_dir: Path,
    run_set: Path,
    baseline_path: Path | None = None,
    compile_cache: Path | None = None,
    process_started_unix_s: float | None = None,
) -> dict:
    """Measure every cycle of one experiment and write its run set (the list of its cycles).

    The cycles' own artifacts (runs/{experiment}/cycle-{n}/) are written as each cycle completes and
    are not outputs Snakemake deletes when a job dies: a rerun measures only the missing cycles.
    `process_started_unix_s`: when the job's own process started (the Snakemake script passes it);
    the time from then to measuring, less any wait for the GPUs, is the job's `startup` phase.
    """
    from llm_energy import measure, placement
    from llm_energy.config import load_campaign

    run_set = Path(run_set)
    campaign = load_campaign(config)
    # The job's GPUs first, before anything could create a CUDA context: its processes (the isolated
    # cycles', the data-parallel workers') inherit CUDA_VISIBLE_DEVICES, and the locks are held until
    # this function returns or the process dies.
    with placement.placed(campaign.experiments[experiment_id], campaign.config["campaign"]["gpus"]) as placed:
        arguments = {
            "experiment_id": experiment_id,
            "config": dict(config),
            "model_manifest": str(model_manifest),
            "dataset_dir": str(dataset_dir),
            "experiment_dir": str(run_set.parent),
            "baseline_path": str(baseline_path) if baseline_path else None,
            "compile_cache": str(compile_cache) if compile_cache else None,
            "placement": placed.describe(),
        }
        run, _ = experiment_run(**arguments, campaign=campaign)
        cycles = list(range(1, campaign.cycles + 1))
        # Measured here, before measuring starts; the wait for the GPUs was another job's time.
        startup_s = None if process_started_unix_s is None else time.time() - process_started_unix_s - placed.waited_s
        if run.experiment.cycle_isolation == "process":
            report = measure.measure_cycles_isolated(arguments, cycles)
        else:
            report = measure.measure_experiment(run, cycles)
        if startup_s is not None:
            report["timing"] = measure.count_startup(report["timing"], startup_s)
    entries = []
    for cycle in cycles:
        paths = measure.RunPaths.in_dir(measure.cycle_dir(run.experiment_dir, cycle))
        document = artifacts.read_json_artifact(paths.result, "run_result")
        entries.append(
            {
                "cycle": cycle,
                "result": str(paths.result.relative_to(run_set.parent)),
                "status": document["data"]["status"],
            }
        )
    data = {
        "experiment_id": experiment_id,
        "cycle_isolation": run.experiment.cycle_isolation,
        "cycles": entries,
        "measured_now": report["measured_cycles"],
        "timing": report["timing"],
    }
    artifacts.write_json_artifact(run_set, "run_set", data, run.provenance)
    return data


def this_process_started_unix_s() -> float:
    """When this process was created (unix s), for run_inference_job's startup phase."""
    import psutil

    return psutil.Process().create_time()


def run_results_of(run_set: Path) -> list[Path]:
    """The cycles' result.json files listed by a run set."""
    document = artifacts.read_json_artifact(Path(run_set), "run_set")
    return [Path(run_set).parent / entry["result"] for entry in document["data"]["cycles"]]


def estimate_flops_job(model: str, model_manifest: Path, dtype: str, out: Path, config_sha256: str) -> dict:
    """The cost model of `model` at `dtype`, cross-checked once on the real model: no measurement needed."""
    from llm_energy import flops, models

    manifest = models.read_model_manifest(Path(model_manifest))
    data = flops.estimate_model_flops(
        models.resolve_model_path(Path(model_manifest)),
        model=model,
        dtype=dtype,
        parameter_count=manifest["parameter_count"],
    )
    prov = provenance.collect(config_sha256=config_sha256, inputs=[Path(model_manifest)], include_gpus=False)
    artifacts.write_json_artifact(out, "flops_model", data, prov)
    return data


def aggregate_job(
    experiment_id: str, run_set: Path, flops_path: Path | None, out: Path, config_sha256: str | None
) -> dict:
    from llm_energy import aggregate

    run_results = run_results_of(Path(run_set))
    data = aggregate.aggregate_experiment(run_results, Path(flops_path) if flops_path else None)
    # Where the job's wall time went (load, compile, warm-up, baseline, windows, the rest).
    data["time_accounting"] = artifacts.read_json_artifact(Path(run_set), "run_set")["data"]["timing"]
    inputs = [Path(run_set), *run_results] + ([Path(flops_path)] if flops_path else [])
    prov = provenance.collect(experiment=experiment_id, config_sha256=config_sha256, inputs=inputs, include_gpus=False)
    artifacts.write_json_artifact(out, "experiment_result", data, prov)
    return data


def summarize_job(experiment_results: Sequence[Path], outputs: Mapping[str, Path], config_sha256: str | None) -> None:
    """summary.csv/.parquet and metrics.csv/.parquet (outputs keyed summary_csv, summary_parquet,
    metrics_csv, metrics_parquet) from the experiment results."""
    from llm_energy import summary

    paths = sorted(Path(p) for p in experiment_results)
    log.info("summary: reading %d experiment results", len(paths))
    tables = summary.build_tables(paths)
    prov = provenance.collect(config_sha256=config_sha256, inputs=paths, include_gpus=False)
    paths_out = summary.TablePaths(
        Path(outputs["summary_csv"]),
        Path(outputs["summary_parquet"]),
        Path(outputs["metrics_csv"]),
        Path(outputs["metrics_parquet"]),
    )
    summary.write_tables(tables, paths_out, prov)
    log.info("summary: %d experiments -> %s", len(tables.summary), outputs["summary_csv"])


def plot_job(
    figure: str, summary_parquet: Path, metrics_parquet: Path, png: Path, svg: Path, runs_dir: Path | None
) -> None:
    """One campaign figure (llm_energy.plots.FIGURES) from the summary and metrics tables and, where it
    needs them, the raw runs under runs_dir."""
    from llm_energy import plots, summary

    log.info("figure %s: reading %s and %s", figure, summary_parquet, metrics_parquet)
    tables = summary.read_tables(summary_parquet, metrics_parquet)
    plots.plot(figure, tables, Path(png), Path(svg), runs_dir=Path(runs_dir) if runs_dir else None)


def plot_timelines_job(summary_parquet: Path, runs_dir: Path, out_dir: Path, workers: int) -> None:
    """Every experiment's power timeline figure into out_dir (one process per worker)."""
    from llm_energy import plots, summary

    log.info("timelines: reading %s, %d workers", summary_parquet, workers)
    frame = summary.read_summary(summary_parquet)
    skipped = plots.plot_run_timelines(frame, Path(runs_dir), Path(out_dir), workers=workers)
    log.info("timelines: %d experiments, %d without a figure", len(frame), len(skipped))


def report_pages_job(
    summary_parquet: Path, experiment_results: Sequence[Path], runs_dir: Path, outputs: Mapping[str, Path]
) -> None:
    """The report's summary, flags and provenance pages."""
    from llm_energy import report
    from llm_energy.summary import read_summary

    log.info("report pages: reading %s and %d experiment results", summary_parquet, len(experiment_results))
    frame = read_summary(summary_parquet)
    experiment_provenance = {}
    for path in experiment_results:
        document = artifacts.read_json_artifact(Path(path), "experiment_result")
        experiment_provenance[document["data"]["experiment_id"]] = document.get("provenance") or {}
    rendered_by = provenance.collect(include_gpus=False)
    report.write_pages(
        frame, experiment_provenance, Path(runs_dir), rendered_by, {name: Path(path) for name, path in outputs.items()}
    )
