from llm_energy.jobs import config_sha256, estimate_flops_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    estimate_flops_job(
        snakemake.wildcards.model,
        snakemake.input.model,
        snakemake.wildcards.dtype,
        snakemake.output[0],
        config_sha256(snakemake.config),
    )
