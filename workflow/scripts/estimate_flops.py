from llm_energy.jobs import config_sha256, estimate_flops_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    estimate_flops_job(
        snakemake.wildcards.experiment,
        snakemake.input.model,
        snakemake.input.run_set,
        snakemake.params.dtype,
        snakemake.params.batch_size,
        snakemake.output[0],
        config_sha256(snakemake.config),
    )
