# prepare_dataset: prompts + manifest for each dataset of the campaign (runs on the submit host:
# compute nodes need no network).


rule prepare_dataset:
    input:
        tokenizer=tokenizer_manifest,
    output:
        prompts="resources/datasets/{dataset}/prompts.jsonl",
        manifest="resources/datasets/{dataset}/manifest.json",
    log:
        "resources/logs/prepare_dataset/{dataset}.log",
    conda:
        "../../envs/pytorch.yaml"
    params:
        spec=lambda wc: CONFIG["datasets"][wc.dataset],
    script:
        "../scripts/prepare_dataset.py"
