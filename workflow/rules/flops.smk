# estimate_flops: analytic FLOPs for the requests actually measured (cycle 1's token counts),
# cross-checked on the real model.


rule estimate_flops:
    input:
        model=lambda wc: ancient(f"resources/models/{experiment_of(wc).model}/manifest.json"),
        run_set=f"{RESULTS}/runs/{{experiment}}/cycles.json",
    output:
        f"{RESULTS}/flops/{{experiment}}.json",
    params:
        dtype=lambda wc: experiment_of(wc).parameters["dtype"],
        batch_size=lambda wc: experiment_of(wc).parameters["batch_size"],
    log:
        f"{RESULTS}/logs/estimate_flops/{{experiment}}.log",
    conda:
        "../../envs/pytorch.yaml"
    script:
        "../scripts/estimate_flops.py"
