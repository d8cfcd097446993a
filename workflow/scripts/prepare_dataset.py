from pathlib import Path

from llm_energy.jobs import prepare_dataset_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    prepare_dataset_job(
        snakemake.wildcards.dataset,
        snakemake.params.spec,
        Path(snakemake.output.manifest).parent,
        snakemake.input.tokenizer[0] if snakemake.input.tokenizer else None,
        snakemake.params.config_sha256,
    )
