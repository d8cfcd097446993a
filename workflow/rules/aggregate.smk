# aggregate: cycles combined per experiment; summarize: the narrow summary (one row per experiment)
# and the long metrics table (one row per experiment and metric).
# In figures-only mode the experiment results already exist (e.g. an archived results/ tree) and no
# rule upstream of them is part of the DAG: nothing is downloaded and no inference runs.

if FIGURES_ONLY:
    EXPERIMENT_RESULTS = sorted(glob.glob(f"{RESULTS}/experiments/*.json"))
    if not EXPERIMENT_RESULTS:
        raise WorkflowError(
            f"figures_only: no experiment results in {RESULTS}/experiments/; point results_dir at an "
            "existing results tree (e.g. --config figures_only=true results_dir=results/examples/...)"
        )
else:
    EXPERIMENT_RESULTS = expand(f"{RESULTS}/experiments/{{experiment}}.json", experiment=EXPERIMENTS)

    rule aggregate:
        input:
            run_set=f"{RESULTS}/runs/{{experiment}}/cycles.json",
            flops=lambda wc: flops_model_of(experiment_of(wc)),
        output:
            f"{RESULTS}/experiments/{{experiment}}.json",
        log:
            f"{RESULTS}/logs/aggregate/{{experiment}}.log",
        conda:
            "../../envs/analysis.yaml"
        script:
            "../scripts/aggregate.py"


rule summarize:
    input:
        EXPERIMENT_RESULTS,
    output:
        summary_csv=SUMMARY_CSV,
        summary_parquet=SUMMARY_PARQUET,
        metrics_csv=METRICS_CSV,
        metrics_parquet=METRICS_PARQUET,
    log:
        f"{RESULTS}/logs/summarize.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/summarize.py"
