from pathlib import Path

from llm_energy.jobs import baseline_cache_path, compile_cache_dir, run_inference_job, this_process_started_unix_s
from llm_energy.logs import job_logging

# The guard matters: vLLM's engine core runs in a spawned subprocess, which re-imports this script.
if __name__ == "__main__":
    with job_logging(snakemake.log[0]):
        run_inference_job(
            experiment_id=snakemake.wildcards.experiment,
            config=snakemake.config,
            model_manifest=snakemake.input.model,
            dataset_dir=Path(snakemake.input.dataset).parent,
            run_set=snakemake.output.run_set,
            baseline_path=baseline_cache_path(),
            compile_cache=compile_cache_dir(),
            process_started_unix_s=this_process_started_unix_s(),
        )
