from pathlib import Path

from llm_energy.jobs import baseline_cache_path, run_inference_job
from llm_energy.logs import job_logging

# The guard matters: vLLM's engine core runs in a spawned subprocess, which re-imports this script.
if __name__ == "__main__":
    with job_logging(snakemake.log[0]):
        run_inference_job(
            experiment_id=snakemake.wildcards.experiment,
            config=snakemake.config,
            cycle=int(snakemake.wildcards.cycle),
            model_manifest=snakemake.input.model,
            dataset_dir=Path(snakemake.input.dataset).parent,
            result=snakemake.output.result,
            requests=snakemake.output.requests,
            timeline=snakemake.output.timeline,
            baseline_path=baseline_cache_path(),
        )
