# llm-energy: measure what LLM inference costs.
#   snakemake --cores 2                                   # the embedded default campaign
#   snakemake --cores 2 --configfile config/campaigns/X.yaml
#   snakemake --cores 2 --config figures_only=true --forceall   # figures from cached results only
#   snakemake --report report.html                        # figures, summary, flags, provenance in one file
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

WORKFLOW_DIR = Path(workflow.basedir) / "workflow"
# The package is importable here and in every job (also inside conda environments and SLURM jobs,
# which inherit the environment), whether or not it was pip-installed.
sys.path.insert(0, str(WORKFLOW_DIR))
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(WORKFLOW_DIR), os.environ.get("PYTHONPATH")])))


# Measurements never share a GPU: on one machine the `gpu` resource is the campaign's GPUs (1 on a
# CPU-only machine), registered in workflow/rules/common.smk once the campaign is read; on a cluster,
# SLURM gives each job its own GPUs.


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/inference.smk"
include: "workflow/rules/flops.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/plots.smk"


rule all:
    default_target: True
    input:
        SUMMARY_CSV,
        SUMMARY_PARQUET,
        METRICS_CSV,
        METRICS_PARQUET,
        CAMPAIGN_FIGURES,
        TIMELINES,
        REPORT_PAGES,


# The campaign's figures and report pages without the per-experiment timelines (a campaign of 1,000
# experiments draws these in under a minute; its 1,000 timelines take a few minutes more).
rule figures:
    input:
        SUMMARY_CSV,
        METRICS_CSV,
        CAMPAIGN_FIGURES,
        REPORT_PAGES,


# Downloads, dataset preparation, aggregation and plots run on the submit host (a cluster's compute
# nodes need no network, and these jobs are too small to be worth a queue slot).
localrules:
    all,
    figures,
    prepare_dataset,
    download_model,
    summarize,
    plot,
    plot_timelines,
    report_pages,


if not FIGURES_ONLY:

    localrules:
        aggregate,
