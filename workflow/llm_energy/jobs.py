"""One function per workflow rule: plain arguments in, artifacts out.

The Snakemake scripts only unpack `snakemake` and call these, so every rule's logic is importable
and testable without Snakemake (and a change here does not make Snakemake rerun finished jobs).
"""

from __future__ import annotations

import logging
import socket
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


def prepare_dataset_job(name: str, spec: Mapping[str, Any], out_dir: Path, tokenizer_manifest: Path | None,
                        config_sha256: str) -> dict:
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


def run_inference_job(experiment_id: str, config: Mapping[str, Any], cycle: int, model_manifest: Path,
                      dataset_dir: Path, result: Path, requests: Path, timeline: Path,
                      baseline_path: Path | None = None) -> dict:
    from llm_energy import datasets, measure, models
    from llm_energy.config import load_campaign

    campaign = load_campaign(config)
    exp = campaign.experiments[experiment_id]
    energy_config = campaign.config["energy"]
    model_dir = models.resolve_model_path(Path(model_manifest))
    prompts = [p["prompt"] for p in datasets.load_prompts(Path(dataset_dir))]
    prov = provenance.collect(
        experiment=exp.id, config_sha256=campaign.sha256,
        inputs=[Path(model_manifest), Path(dataset_dir) / "manifest.json", Path(dataset_dir) / "prompts.jsonl"],
        extra={"job": measure.job_provenance()},
    )
    paths = measure.RunPaths(result=Path(result), requests=Path(requests), timeline=Path(timeline))
    return measure.run_cycle(exp, int(cycle), model_dir, prompts, dict(energy_config), paths, prov,
                             baseline_path=Path(baseline_path) if baseline_path else None)


def estimate_flops_job(experiment_id: str, model_manifest: Path, requests_path: Path, dtype: str, batch_size: int,
                       out: Path, config_sha256: str) -> dict:
    from llm_energy import flops, models

    frame, _ = artifacts.read_table_artifact(requests_path, "requests_table")
    data = flops.estimate_experiment_flops(
        models.resolve_model_path(Path(model_manifest)), frame, dtype=dtype, batch_size=batch_size
    )
    prov = provenance.collect(experiment=experiment_id, config_sha256=config_sha256,
                              inputs=[Path(model_manifest), Path(requests_path)], include_gpus=False)
    artifacts.write_json_artifact(out, "flops_estimate", data, prov)
    return data


def aggregate_job(experiment_id: str, run_results: Sequence[Path], flops_path: Path | None, out: Path,
                  config_sha256: str | None) -> dict:
    from llm_energy import aggregate

    data = aggregate.aggregate_experiment([Path(p) for p in run_results], Path(flops_path) if flops_path else None)
    inputs = [Path(p) for p in run_results] + ([Path(flops_path)] if flops_path else [])
    prov = provenance.collect(experiment=experiment_id, config_sha256=config_sha256, inputs=inputs,
                              include_gpus=False)
    artifacts.write_json_artifact(out, "experiment_result", data, prov)
    return data


def summarize_job(experiment_results: Sequence[Path], csv_path: Path, parquet_path: Path,
                  config_sha256: str | None) -> None:
    from llm_energy import summary

    paths = sorted(Path(p) for p in experiment_results)
    frame = summary.build_summary(paths)
    prov = provenance.collect(config_sha256=config_sha256, inputs=paths, include_gpus=False)
    summary.write_summary(frame, Path(csv_path), Path(parquet_path), prov)
    log.info("summary: %d experiments -> %s", len(frame), csv_path)


PLOTS = {
    "energy_vs_batch_size": "plot_energy_vs_batch_size",
    "throughput_vs_energy": "plot_throughput_vs_energy",
    "energy_breakdown": "plot_energy_breakdown",
    "latency": "plot_latency",
}


def plot_job(figure: str, summary_parquet: Path, png: Path, svg: Path) -> None:
    from llm_energy import plots

    frame, _ = artifacts.read_table_artifact(summary_parquet, "summary_table")
    getattr(plots, PLOTS[figure])(frame, Path(png), Path(svg))
