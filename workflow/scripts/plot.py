from llm_energy.jobs import plot_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    plot_job(
        snakemake.wildcards.figure,
        snakemake.input.summary,
        snakemake.input.metrics,
        snakemake.output.png,
        snakemake.output.svg,
        snakemake.params.runs_dir,
    )
