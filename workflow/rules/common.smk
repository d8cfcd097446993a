# Campaign loading and the paths every rule shares.
import glob

import yaml

from llm_energy import plots
from llm_energy import report as report_pages
from llm_energy.config import load_campaign
from llm_energy.errors import ConfigError
from llm_energy.placement import job_threads


def _campaign_config(given):
    """--configfile replaces the embedded default campaign instead of merging into it (a merge would
    silently add the default's tiny models to every campaign); --config key=value still overrides."""
    if workflow.overwrite_configfiles:
        return dict(given)
    default = yaml.safe_load(Path(workflow.basedir, "config", "config.yaml").read_text())
    for key, value in given.items():
        default[key] = value
    return default


try:
    CAMPAIGN = load_campaign(_campaign_config(config))
except ConfigError as error:
    # One clear message, before any job runs and before anything is written.
    raise WorkflowError(f"Invalid configuration: {error}") from None


def _check_backends_installed():
    """Without conda deployment every job runs in this environment: a backend missing here would fail
    every one of its jobs, so stop now. With conda deployment, envs/ brings each engine."""
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    from llm_energy.backends import require_installed

    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method or CAMPAIGN.config["figures_only"]:
        return
    try:
        require_installed(
            CAMPAIGN.config["backends"],
            CAMPAIGN.config["backend_settings"],
            used={e.backend for e in CAMPAIGN.experiments.values()},
        )
    except ConfigError as error:
        raise WorkflowError(f"Invalid configuration: {error}") from None


_check_backends_installed()
# Jobs see the validated campaign (defaults filled) as snakemake.config; its hash in every artifact's
# provenance is computed there. It is deliberately not one of the params (a value that changes with
# every campaign edit would rerun every finished measurement after, say, adding one batch size).
config.clear()
config.update(CAMPAIGN.config)
CONFIG = CAMPAIGN.config
EXPERIMENTS = CAMPAIGN.experiments
RESULTS = CONFIG["results_dir"]
FIGURES_ONLY = CONFIG["figures_only"]


def _gpu_slots():
    """The campaign's GPUs on this box (campaign.gpus) and the `gpu` resource each run_inference job
    takes: as many GPUs as its backend declares, so Snakemake runs side by side only what fits. On a
    cluster SLURM gives each job its GPUs; a job's request there is what its backend declares."""
    from llm_energy import placement

    spec = placement.GpuJobsSpec.of(CONFIG["campaign"]["gpus"])
    if FIGURES_ONLY:
        return 0, {}
    if not workflow.local_exec:
        return 0, {eid: max(placement.execution_of(e).gpus, 1) for eid, e in EXPERIMENTS.items()}
    try:
        box = len(placement.box_gpus(spec))
        placement.check_fits(EXPERIMENTS, box, spec)
    except ConfigError as error:
        raise WorkflowError(f"Invalid configuration: {error}") from None
    return box, {eid: placement.job_gpu_slots(placement.execution_of(e), box, spec) for eid, e in EXPERIMENTS.items()}


BOX_GPUS, GPU_SLOTS = _gpu_slots()


def inference_threads(wildcards):
    """run_inference's threads: the local cores, or its GPUs' share of them when jobs share the box."""
    if not workflow.local_exec:
        return 1
    return job_threads(os.cpu_count() or 1, GPU_SLOTS.get(wildcards.experiment, 1), BOX_GPUS)


# One gpu slot per GPU of the campaign (1 without GPUs: CPU measurements never overlap either), unless
# --resources or a profile says otherwise.
if workflow.local_exec and "gpu" not in workflow.global_resources:
    from llm_energy.placement import gpu_capacity

    workflow.register_resource("gpu", gpu_capacity(BOX_GPUS))

SUMMARY_CSV = f"{RESULTS}/summary.csv"
SUMMARY_PARQUET = f"{RESULTS}/summary.parquet"
METRICS_CSV = f"{RESULTS}/metrics.csv"
METRICS_PARQUET = f"{RESULTS}/metrics.parquet"
RUNS_DIR = f"{RESULTS}/runs"
# Figure and report page names are defined once, in the package.
PLOT_FIGURES = plots.FIGURES
TIMELINES = f"{RESULTS}/figures/{plots.TIMELINES_DIR}"
RUN_TIMELINE_CAPTION = plots.RUN_TIMELINE_CAPTION
CAMPAIGN_FIGURES = expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=plots.FIGURE_NAMES, ext=["png", "svg"])
REPORT_PAGE_NAMES = report_pages.PAGE_NAMES
REPORT_PAGE_TITLES = report_pages.PAGE_TITLES
REPORT_PAGE_CAPTIONS = report_pages.PAGE_CAPTIONS
REPORT_PAGES = expand(f"{RESULTS}/report/{{page}}.html", page=REPORT_PAGE_NAMES)


wildcard_constraints:
    experiment=r"[^/]+",
    cycle=r"\d+",
    model=r"[A-Za-z0-9_-]+",
    dataset=r"[A-Za-z0-9_-]+",
    dtype=r"[a-z0-9_]+",
    figure="|".join(plots.FIGURE_NAMES),


def experiment_of(wildcards):
    try:
        return EXPERIMENTS[wildcards.experiment]
    except KeyError:
        raise WorkflowError(f"'{wildcards.experiment}' is not an experiment of this campaign") from None


def tokenizer_manifest(wildcards):
    """A synthetic dataset is sized in tokens of one model's tokenizer: that model comes first."""
    spec = CONFIG["datasets"][wildcards.dataset]
    if spec["source"] == "synthetic":
        return [ancient(f"resources/models/{spec['tokenizer_model']}/manifest.json")]
    return []


def flops_model_of(experiment):
    """The FLOPs cost model of an experiment's model at its dtype (one per model and dtype)."""
    return f"resources/models/{experiment.model}/flops-{experiment.parameters['dtype']}.json"
