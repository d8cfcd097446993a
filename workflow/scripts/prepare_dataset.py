from pathlib import Path

from llm_energy.jobs import config_sha256, prepare_dataset_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    prepare_dataset_job(
        snakemake.wildcards.dataset,
        snakemake.params.spec,
        Path(snakemake.output.manifest).parent,
        next(iter(snakemake.input.get("tokenizer", [])), None),
        config_sha256(snakemake.config),
    )
