from pathlib import Path

from llm_energy.jobs import config_sha256, prepare_model_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    prepare_model_job(
        snakemake.wildcards.model,
        snakemake.params.spec,
        Path(snakemake.output.manifest).parent,
        config_sha256(snakemake.config),
    )
