from llm_energy.jobs import plot_timelines_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    plot_timelines_job(snakemake.input[0], snakemake.params.runs_dir, snakemake.output[0], snakemake.threads)
