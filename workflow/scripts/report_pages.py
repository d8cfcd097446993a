from llm_energy.jobs import report_pages_job
from llm_energy.logs import job_logging

with job_logging(snakemake.log[0]):
    report_pages_job(
        snakemake.input.summary, snakemake.input.experiments, snakemake.params.runs_dir, dict(snakemake.output.items())
    )
