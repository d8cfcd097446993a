# download_model: weights + tokenizer + manifest (hub snapshot, local folder, or built-in tiny model).


rule download_model:
    output:
        manifest="resources/models/{model}/manifest.json",
    log:
        "resources/logs/download_model/{model}.log",
    conda:
        "../../envs/pytorch.yaml"
    params:
        spec=lambda wc: CONFIG["models"][wc.model],
    script:
        "../scripts/download_model.py"
