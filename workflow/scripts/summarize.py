from llm_energy.jobs import summarize_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    summarize_job(snakemake.input, snakemake.output.csv, snakemake.output.parquet, snakemake.params.config_sha256)
