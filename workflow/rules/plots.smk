# plot: one rule for every figure; each lands in the HTML report (snakemake --report report.html).


rule plot:
    input:
        SUMMARY_PARQUET,
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        svg=f"{RESULTS}/figures/{{figure}}.svg",
    log:
        f"{RESULTS}/logs/plot/{{figure}}.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/plot.py"
