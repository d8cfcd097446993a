from llm_energy.jobs import aggregate_job, config_sha256
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    aggregate_job(
        snakemake.wildcards.experiment,
        snakemake.input.run_set,
        snakemake.input.flops,
        snakemake.output[0],
        config_sha256(snakemake.config),
    )
