# estimate_flops: the FLOPs cost model of one model at one dtype, cross-checked once on the real model.
# It needs no measurement, so it runs beside the GPU jobs; aggregate applies it to each cycle's own
# requests.


rule estimate_flops:
    input:
        model="resources/models/{model}/manifest.json",
    output:
        "resources/models/{model}/flops-{dtype}.json",
    log:
        "resources/logs/estimate_flops/{model}-{dtype}.log",
    conda:
        "../../envs/pytorch.yaml"
    script:
        "../scripts/estimate_flops.py"
