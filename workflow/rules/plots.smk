# plot: one job per campaign figure (llm_energy.plots.FIGURES); plot_timelines: every experiment's power
# timeline in one job (a campaign of 1,000 experiments would spend longer starting 1,000 jobs than
# drawing); report_pages: the summary table with units, the flags and the provenance. Everything here
# lands in the HTML report (snakemake --report report.html) with its caption. The figures read the
# raw runs (runs/) where they need them; in figures-only mode an archive without runs/ gets figures
# that say so.


rule plot:
    input:
        summary=SUMMARY_PARQUET,
        metrics=METRICS_PARQUET,
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            caption="../report/caption.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        svg=f"{RESULTS}/figures/{{figure}}.svg",
    log:
        f"{RESULTS}/logs/plot/{{figure}}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        runs_dir=RUNS_DIR,
        caption=lambda wc: PLOT_FIGURES[wc.figure].caption,
    script:
        "../scripts/plot.py"


rule plot_timelines:
    input:
        SUMMARY_PARQUET,
    output:
        report(
            directory(TIMELINES),
            patterns=["{experiment}.png"],
            caption="../report/caption.rst",
            category="Power timelines",
            labels={"experiment": "{experiment}"},
        ),
    log:
        f"{RESULTS}/logs/plot_timelines.log",
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    params:
        runs_dir=RUNS_DIR,
        caption=RUN_TIMELINE_CAPTION,
    script:
        "../scripts/plot_timelines.py"


rule report_pages:
    input:
        summary=SUMMARY_PARQUET,
        experiments=EXPERIMENT_RESULTS,
    output:
        **{
            page: report(
                f"{RESULTS}/report/{page}.html",
                caption="../report/caption.rst",
                category="Campaign",
                labels={"page": REPORT_PAGE_TITLES[page]},
            )
            for page in REPORT_PAGE_NAMES
        },
    log:
        f"{RESULTS}/logs/report_pages.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        runs_dir=RUNS_DIR,
        caption=lambda wc, output: "\n\n".join(REPORT_PAGE_CAPTIONS[p] for p in REPORT_PAGE_NAMES),
    script:
        "../scripts/report_pages.py"
