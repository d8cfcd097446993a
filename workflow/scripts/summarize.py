from llm_energy.jobs import config_sha256, summarize_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    summarize_job(snakemake.input, dict(snakemake.output.items()), config_sha256(snakemake.config))
