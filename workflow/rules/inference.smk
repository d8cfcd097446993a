# run_inference: every cycle of one experiment, the model loaded and warmed up once (or one fresh
# process per cycle with campaign.cycle_isolation: process). Never two at once on a GPU: each job takes
# as many of the `gpu` resource as it needs GPUs (common.smk: the campaign's GPUs, 1 on a CPU-only
# machine, so CPU measurements do not overlap either), and the job itself takes those GPUs from the
# allocator (llm_energy.placement) and runs with CUDA_VISIBLE_DEVICES naming them.
# The output is the run set (the list of the experiment's cycles). Each cycle's artifacts,
# runs/{experiment}/cycle-{n}/{result.json,requests.parquet,timeline.parquet}, are written as the
# cycle completes and are deliberately not outputs: Snakemake deletes the outputs of a job that died,
# and a rerun must keep the completed cycles and measure only the missing ones.

# openai_server is a client (transformers tokenizer + aiohttp): the server it launches brings its own.
BACKEND_ENVS = {
    "pytorch": "../../envs/pytorch.yaml",
    "vllm": "../../envs/vllm.yaml",
    "openai_server": "../../envs/pytorch.yaml",
}


rule run_inference:
    input:
        model=lambda wc: ancient(f"resources/models/{experiment_of(wc).model}/manifest.json"),
        prompts=lambda wc: ancient(f"resources/datasets/{experiment_of(wc).dataset}/prompts.jsonl"),
        dataset=lambda wc: ancient(f"resources/datasets/{experiment_of(wc).dataset}/manifest.json"),
    output:
        run_set=f"{RESULTS}/runs/{{experiment}}/cycles.json",
    log:
        f"{RESULTS}/logs/run_inference/{{experiment}}.log",
    conda:
        lambda wc: BACKEND_ENVS[experiment_of(wc).backend]
    # No params: the job looks its experiment up by id in the campaign it receives, and the id already
    # hashes every parameter that changes the measurement. A finished measurement is never rerun
    # because unrelated campaign settings (energy reporting, other experiments) changed.
    # All local cores (Snakemake caps threads at --cores): nothing else (a FLOPs estimate, a plot)
    # competes for the CPU that drives the GPU while a window is open. On a cluster the profile sets
    # cpus_per_task instead.
    # With several GPUs, a job that holds some of them claims their share (placement.job_threads).
    threads: inference_threads
    resources:
        gpu=lambda wc: GPU_SLOTS.get(wc.experiment, 1),
    script:
        "../scripts/run_inference.py"
