"""The measurement harness: one experiment, its model loaded once, its cycles measured back to back.

    load -> compile -> warm-up until converged -> active-idle baseline -> for each cycle:
        window (the measured request set, repeated until campaign.min_window_s)
        prefill-only window (energy.phase_split: differential)
        write the cycle's artifacts

Everything before the first window is *setup*: measured (time and energy) in its own windows and
never inside a measured window. A cycle whose result.json already exists is not measured again, so a
job killed in cycle 3 resumes at cycle 3. `campaign.cycle_isolation: process` measures each cycle in
a fresh process instead (load-to-load variance studies): the same sequence, one cycle at a time.

The harness must not move what it measures: between a window's edges it only calls the backend
(batch by batch, with a clock read between batches); the power sampler runs in its own process and
nothing else of ours runs in this one (see llm_energy.energy.session). Python's garbage collector is
the one thing of ours that can still run inside a window: its full collections scan every live object,
and the harness accumulates objects (records, frames) that a bare loop never holds. So each window
starts on a collected heap with everything alive frozen out of the collector's scans (what vLLM's and
SGLang's servers do after their warm-up), and the collections that still ran inside it are recorded.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from llm_energy import artifacts, clock, hardware, host_cpu, metrics, placement, topology
from llm_energy.backends import create_backend
from llm_energy.backends.base import Backend, DecodingSettings, Request, RequestRecord
from llm_energy.backends.batching import make_batches
from llm_energy.config import Experiment, WarmupSpec
from llm_energy.energy import EnergySession, EnergySettings
from llm_energy.energy.host_share import HostShareWatch
from llm_energy.energy.validity import invalidating_flags
from llm_energy.errors import BackendError, ConfigError
from llm_energy.load import LoadSpec, Schedule

log = logging.getLogger(__name__)

# Warm-up is bounded even when batch times never settle (a noisy shared CPU): then the run is flagged.
WARMUP_FLAG_NOT_CONVERGED = "warmup_not_converged"
PACE_FLAG_VARIED = "pace_varied_in_window"
FLAG_RECOMPILED = "recompiled_in_window"


@dataclass(frozen=True)
class RunPaths:
    """The three artifacts of one cycle; result.json is written last and marks the cycle complete."""

    result: Path
    requests: Path
    timeline: Path

    @classmethod
    def in_dir(cls, run_dir: Path) -> RunPaths:
        return cls(
            result=run_dir / "result.json", requests=run_dir / "requests.parquet", timeline=run_dir / "timeline.parquet"
        )


def cycle_dir(experiment_dir: Path, cycle: int) -> Path:
    return Path(experiment_dir) / f"cycle-{cycle}"


def decoding_settings(experiment: Experiment, cycle: int) -> DecodingSettings:
    p = experiment.parameters
    return DecodingSettings(
        mode=p["decoding_mode"],
        temperature=p["temperature"],
        top_p=p["top_p"],
        top_k=p["top_k"],
        output_length=p["output_length"],
        max_output_tokens=p["max_output_tokens"],
        # Each cycle samples with its own seed, so sampled cycles are independent yet reproducible.
        seed=experiment.seed + cycle,
    )


def prefill_only(decoding: DecodingSettings) -> DecodingSettings:
    """The same requests with exactly one output token: the prefill pass of differential phases."""
    return dataclasses.replace(decoding, max_output_tokens=1, output_length="fixed")


def backend_settings(
    experiment: Experiment, compile_cache_dir: Path | None = None, log_dir: Path | None = None
) -> dict[str, Any]:
    settings = dict(experiment.backend_settings)
    settings["trust_remote_code"] = experiment.model_spec["trust_remote_code"]
    settings["batching"] = experiment.parameters["batching"]
    settings["token_budget"] = experiment.parameters["token_budget"]
    settings["seed"] = experiment.seed
    settings["serving"] = experiment.load is not None
    if log_dir is not None:  # where a backend keeps logs of its own (a launched server's), beside the run's
        settings["log_dir"] = str(log_dir)
    if compile_cache_dir is not None:
        settings["compile_cache_dir"] = str(compile_cache_dir)
    return settings


def max_model_len(experiment: Experiment) -> int:
    configured = experiment.model_spec["max_model_len"]
    needed = experiment.parameters["max_input_tokens"] + experiment.parameters["max_output_tokens"]
    return configured or needed


def select_requests(requests: list[Request], experiment: Experiment) -> list[Request]:
    """The measured request set: every prompt, or campaign.requests_per_cycle of them."""
    wanted = experiment.request_count(experiment.requests_per_cycle)
    if wanted is not None and wanted > len(requests):
        raise ConfigError(
            "campaign.requests_per_cycle",
            f"asks for {wanted} requests but dataset '{experiment.dataset}' has {len(requests)} prompts",
            f"Lower it, or give datasets.{experiment.dataset} more prompts (sample_size / count).",
        )
    return list(requests[:wanted]) if wanted else list(requests)


def batches_of(requests: Sequence[Request], experiment: Experiment) -> list[list[Request]]:
    """The measured set cut into the batches the window runs (the campaign's batching strategy)."""
    p = experiment.parameters
    return make_batches(requests, p["batch_size"], p["batching"], p["token_budget"], p["max_output_tokens"])


def shape_of(batch: Sequence[Request]) -> tuple[int, int]:
    """What a batch's kernels depend on: its size and its longest prompt."""
    return len(batch), max(r.input_tokens for r in batch)


# ---------------------------------------------------------------------------------------------
# Warm-up


@dataclass
class WarmupResult:
    batch_times_s: list[float] = field(default_factory=list)
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)
    converged: bool = False
    prefill_batches: int = 0

    def describe(self, settings: WarmupSpec | Mapping[str, Any]) -> dict[str, Any]:
        return {
            "batches": len(self.batch_times_s),
            "batch_times_s": self.batch_times_s,
            "batch_shapes": [list(s) for s in self.batch_shapes],
            "converged": self.converged,
            "prefill_only_batches": self.prefill_batches,
            "settings": dataclasses.asdict(WarmupSpec.of(settings)),
        }


def warmup_converged(
    times_s: Sequence[float], shapes: Sequence[tuple[int, int]], min_batches: int, stable_batches: int, tolerance: float
) -> bool:
    """At least `min_batches` batches, and the last `stable_batches` batches of the most common shape
    agree within `tolerance` (max/min - 1): batches of another shape (a partial last batch) are not
    compared with full ones."""
    if len(times_s) < max(min_batches, stable_batches):
        return False
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    modal = max(counts, key=lambda s: (counts[s], s))
    same = [t for t, s in zip(times_s, shapes) if s == modal][-stable_batches:]
    if len(same) < stable_batches or min(same) <= 0:
        return False
    return max(same) / min(same) - 1.0 <= tolerance


def warm_up(
    backend: Backend,
    batches: list[list[Request]],
    batch_size: int,
    decoding: DecodingSettings,
    settings: WarmupSpec | Mapping[str, Any],
    prefill_decoding: DecodingSettings | None = None,
) -> WarmupResult:
    """Run the measured batches round-robin until their times settle and every shape has run
    (`settings`: campaign.warmup).

    Every shape the window will see (the partial last batch too) runs at least once; with a
    prefill-only pass ahead, each of its shapes runs once as well.
    """
    settings = WarmupSpec.of(settings)
    result = WarmupResult()
    started = clock.now()
    needed_shapes = {shape_of(b) for b in batches}
    seen: set[tuple[int, int]] = set()
    position = 0
    while True:
        batch = batches[position % len(batches)]
        position += 1
        t0 = clock.now()
        backend.generate(batch, batch_size, decoding)
        backend.synchronize()
        result.batch_times_s.append(clock.now() - t0)
        result.batch_shapes.append(shape_of(batch))
        seen.add(shape_of(batch))
        result.converged = warmup_converged(
            result.batch_times_s, result.batch_shapes, settings.min_batches, settings.stable_batches, settings.tolerance
        )
        if result.converged and needed_shapes <= seen:
            break
        if clock.now() - started > settings.max_s and needed_shapes <= seen:
            log.warning(
                "warm-up did not converge within campaign.warmup.max_s=%s s (last batch times %s)",
                settings.max_s,
                [round(t, 4) for t in result.batch_times_s[-5:]],
            )
            break
    if prefill_decoding is not None:
        shapes_done: set[tuple[int, int]] = set()
        for batch in batches:
            if shape_of(batch) in shapes_done:
                continue
            shapes_done.add(shape_of(batch))
            backend.generate(batch, batch_size, prefill_decoding)
            result.prefill_batches += 1
        backend.synchronize()
    log.info(
        "warm-up: %d batches in %.1f s, converged: %s",
        len(result.batch_times_s),
        clock.now() - started,
        result.converged,
    )
    return result


# A GPU that has been idle this long has started to drop its clocks (an H200 idles down within
# about a second): the next window would pay for ramping them up again.
REWARM_AFTER_IDLE_S = 1.0


def rewarm(backend: Backend, batches: list[list[Request]], batch_size: int, decoding: DecodingSettings) -> None:
    """One batch right before a window, outside it: after an idle gap (a baseline, a long pause)
    the host and the GPU are out of their steady state, and the window's first batch would pay for it."""
    backend.generate(batches[0], batch_size, decoding)
    backend.synchronize()


def needs_rewarm(busy_until_s: float | None, now_s: float) -> bool:
    """Back-to-back cycles (the previous window closed moments ago, only its artifacts were written
    since) are still in the steady state: a rewarm batch there would only cost GPU time outside the
    windows. After the active-idle baseline, or any longer gap, one batch runs first."""
    return busy_until_s is None or now_s - busy_until_s > REWARM_AFTER_IDLE_S


# ---------------------------------------------------------------------------------------------
# Windows


def settle_heap() -> None:
    """Collect now, outside the window, and freeze what survives: objects alive before a window (the
    model, the engine, earlier cycles' bookkeeping) are then never scanned by a collection inside it.
    Frozen objects are still freed by reference counting; only cyclic garbage among them stays."""
    gc.collect()
    gc.freeze()


def gc_collections() -> list[int]:
    """Collections run so far, per generation (0, 1, 2)."""
    return [generation["collections"] for generation in gc.get_stats()]


@dataclass
class MeasuredWindow:
    record: dict[str, Any]
    requests: list[RequestRecord]
    repeat_of_request: list[int]
    repeats: int
    compilations: tuple[int | None, int | None]
    memory: dict[str, Any]


def _measured(
    session: EnergySession,
    backend: Backend,
    name: str,
    work: Callable[[], Any],
    host_share: HostShareWatch | None = None,
) -> tuple[dict[str, Any], Any, tuple[int | None, int | None], dict[str, Any]]:
    """The edges every measured window shares around `work` (the backend's calls, nothing else):
    a fresh peak-memory interval, a settled heap, the compilation, GC and host-CPU counters read at
    both edges (llm_energy.host_cpu: whether the host took CPU time from the process), and (beside
    other jobs on the box) whether the host's energy was shared with them (host_shared).
    Returns the window's energy record (gc_collections and the recompilation flag in it), what `work`
    returned, the compilation counts and the memory report."""
    backend.reset_peak_memory()
    compiled_before = backend.compilation_count()
    if host_share is not None:
        host_share.open()
    settle_heap()
    gc_before = gc_collections()
    host_before = host_cpu.snapshot()
    handle = session.open_window(name)
    value = work()
    backend.synchronize()
    record = session.close_window(handle)
    record["host_cpu"] = host_cpu.window_record(host_before, host_cpu.snapshot(), record.get("duration_s") or 0.0)
    if taken := host_cpu.flags(record["host_cpu"]):
        record["flags"] = sorted(set(record.get("flags", [])) | taken)
    if host_share is not None:
        host_share.close(record)
    record["gc_collections"] = [after - before for before, after in zip(gc_before, gc_collections())]
    compiled_after = backend.compilation_count()
    if compiled_before is not None and compiled_after is not None and compiled_after != compiled_before:
        record["flags"] = sorted(set(record.get("flags", [])) | {FLAG_RECOMPILED})
    return record, value, (compiled_before, compiled_after), backend.memory_report()


def measure_window(
    session: EnergySession,
    backend: Backend,
    name: str,
    requests: list[Request],
    batch_size: int,
    decoding: DecodingSettings,
    min_window_s: float,
    host_share: HostShareWatch | None = None,
) -> MeasuredWindow:
    """One measured window: the request set, repeated until the window lasts `min_window_s`.

    Between the edges only the backend runs; the loop's own work is one clock read per repeat.
    """

    def repeat_until_long_enough() -> list[list[RequestRecord]]:
        started = clock.now()
        runs: list[list[RequestRecord]] = []
        while True:
            runs.append(backend.generate(requests, batch_size, decoding))
            if clock.now() - started >= min_window_s:
                return runs

    record, runs, compilations, memory = _measured(session, backend, name, repeat_until_long_enough, host_share)
    records = [r for run in runs for r in run]
    repeat_of_request = [i for i, run in enumerate(runs) for _ in run]
    record["repeats"] = len(runs)
    return MeasuredWindow(record, records, repeat_of_request, len(runs), compilations, memory)


def _experiment_record(experiment: Experiment) -> dict[str, Any]:
    """What a cycle's result says about its experiment (an ok cycle adds the engine path it ran)."""
    return {
        "model": experiment.model,
        "backend": experiment.backend,
        "variant": experiment.variant,
        "dataset": experiment.dataset,
        "parameters": experiment.parameters,
    }


def load_requests(requests: Sequence[Request], load: LoadSpec, min_window_s: float) -> tuple[list[Request], list[int]]:
    """The requests one window under load submits: the measured set, cycled until its arrivals span
    min_window_s (one continuous open-loop run, never a drain and a new ramp-up between repeats), each
    with its position as index; and which pass over the set each one is."""
    count = max(len(requests), math.ceil(load.request_rate * min_window_s) + 1)
    cycled = [Request(position, requests[position % len(requests)].prompt_token_ids) for position in range(count)]
    return cycled, [position // len(requests) for position in range(count)]


def measure_load_window(
    session: EnergySession,
    backend: Backend,
    requests: list[Request],
    decoding: DecodingSettings,
    load: LoadSpec,
    min_window_s: float,
    seed: int,
    host_share: HostShareWatch | None = None,
) -> MeasuredWindow:
    """One measured window of open-loop arrivals (llm_energy.load): every request submitted at its
    arrival time, drawn from `seed`, the window from the first submission to the last token."""
    cycled, passes = load_requests(requests, load, min_window_s)
    schedule = Schedule.open_loop(len(cycled), load, seed)
    record, records, compilations, memory = _measured(
        session, backend, "inference", lambda: backend.serve(cycled, decoding, schedule), host_share
    )
    record["repeats"] = max(passes) + 1
    record["load"] = {
        **load.describe(),
        "requests": len(cycled),
        "seed": seed,
        "last_arrival_offset_s": schedule.offsets_s[-1],
    }
    return MeasuredWindow(record, records, passes, max(passes) + 1, compilations, memory)


def load_seed(experiment: Experiment, cycle: int) -> int:
    """Each cycle draws its own arrivals, reproducibly from the campaign seed."""
    return experiment.seed * 1_000_003 + cycle


def requests_frame(
    records: list[RequestRecord], repeats: Sequence[int] | None = None, extra: Mapping[str, Sequence[Any]] | None = None
) -> pd.DataFrame:
    """One row per request; latencies as llm_energy.metrics defines them. `itl_s` holds the request's
    every ITL sample (one per chunk gap), so that aggregation can pool the samples over cycles;
    `repeat` says which repetition of the request set (campaign.min_window_s) the row belongs to."""
    rows = []
    for position, r in enumerate(records):
        itl = metrics.inter_token_latencies_s(r)
        tpot = metrics.time_per_output_token_s(r)
        chunk_times, chunk_tokens = r.arrivals()
        rows.append(
            {
                "request_index": r.index,
                "repeat": 0 if repeats is None else int(repeats[position]),
                "batch_index": -1 if r.batch_index is None else r.batch_index,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "submitted_s": r.submitted_s,
                "first_token_s": float("nan") if r.first_token_s is None else r.first_token_s,
                "finished_s": r.finished_s,
                "e2e_s": r.e2e_s,
                "ttft_s": float("nan") if r.ttft_s is None else r.ttft_s,
                "tpot_s": float("nan") if tpot is None else tpot,
                "itl_mean_s": sum(itl) / len(itl) if itl else float("nan"),
                "token_times_s": list(r.token_times_s or []),
                "chunk_times_s": chunk_times,
                "chunk_tokens": chunk_tokens,
                "itl_s": itl,
                "latency_source": r.latency_source,
                "due_s": float("nan") if r.due_s is None else r.due_s,
                "queue_s": float("nan") if r.queue_s is None else r.queue_s,
                **{
                    name: (float("nan") if values[position] is None else values[position])
                    for name, values in (extra or {}).items()
                },
            }
        )
    columns = [
        "request_index",
        "repeat",
        "batch_index",
        "input_tokens",
        "output_tokens",
        "submitted_s",
        "first_token_s",
        "finished_s",
        "e2e_s",
        "ttft_s",
        "tpot_s",
        "itl_mean_s",
        "token_times_s",
        "chunk_times_s",
        "chunk_tokens",
        "itl_s",
        "latency_source",
        "due_s",
        "queue_s",
        *(extra or {}),
    ]
    return pd.DataFrame(rows, columns=columns)


def _prefill_spans(records: list[RequestRecord]) -> list[tuple[float, float]]:
    """Submission to first token of each request: the time its prompt was being processed."""
    return [(r.submitted_s, r.first_token_s) for r in records if r.first_token_s is not None]


def differential_phases(full: MeasuredWindow, prefill: MeasuredWindow) -> dict[str, Any]:
    """Prefill energy per input token from the prefill-only window; decode = full window - prefill.

    The prefill-only window runs the same batches with one output token, so its GPU energy per input
    token is what the full window spends on its prompts (and first tokens). What remains of the full
    window is decode, divided by its decode tokens (every output token after each request's first).
    """
    gpu_full = full.record["domains"]["gpu"]
    gpu_prefill = prefill.record["domains"]["gpu"]
    if not gpu_full.get("available") or not gpu_prefill.get("available"):
        reason = gpu_full.get("reason") or gpu_prefill.get("reason") or "not measured"
        return {
            "available": False,
            "method": "differential",
            "reason": f"differential phases need measured GPU energy in both windows ({reason})",
        }
    prefill_input = sum(r.input_tokens for r in prefill.requests)
    full_input = sum(r.input_tokens for r in full.requests)
    decode_tokens = sum(max(r.output_tokens - 1, 0) for r in full.requests)
    per_input_j = float(gpu_prefill["gross_j"]) / prefill_input if prefill_input else None
    if per_input_j is None:
        return {"available": False, "method": "differential", "reason": "the prefill window had no input tokens"}
    prefill_j = per_input_j * full_input
    decode_j = float(gpu_full["gross_j"]) - prefill_j
    flags = ["prefill_exceeds_window"] if decode_j < 0 else []
    return {
        "available": True,
        "method": "differential",
        "description": (
            "prefill: a prefill-only window (same batches, one output token, repeated to "
            "campaign.min_window_s) gives GPU energy per input token; decode: the full window's "
            "GPU energy minus that prefill energy, per decode token (output tokens after each "
            "request's first)"
        ),
        "prefill_j": prefill_j,
        "decode_j": decode_j,
        "prefill_energy_per_input_token_j": per_input_j,
        "decode_energy_per_decode_token_j": decode_j / decode_tokens if decode_tokens else None,
        "decode_tokens": decode_tokens,
        "prefill_window": {
            "start_s": prefill.record["start_s"],
            "end_s": prefill.record["end_s"],
            "duration_s": prefill.record["duration_s"],
            "repeats": prefill.repeats,
            "gross_j": float(gpu_prefill["gross_j"]),
            "input_tokens": prefill_input,
            "flags": prefill.record.get("flags", []),
        },
        "flags": flags,
    }


# ---------------------------------------------------------------------------------------------
# One experiment


@dataclass
class ExperimentRun:
    """Everything one process needs to measure an experiment's cycles."""

    experiment: Experiment
    model_dir: Path
    prompts: list[str]
    energy_config: dict[str, Any]
    experiment_dir: Path
    provenance: dict[str, Any]
    baseline_path: Path | None = None
    compile_cache_dir: Path | None = None
    placement: dict[str, Any] | None = None  # llm_energy.placement.Placement.describe(): the job's GPUs

    def host_share_watch(self) -> HostShareWatch | None:
        """Watches the box's other GPUs when other jobs may run beside this one (llm_energy.energy.host_share)."""
        from llm_energy.placement import Placement

        if not self.placement:
            return None
        placed = Placement.from_description(self.placement)
        return HostShareWatch(placed.lock_dir, placed.box, placed.held) if placed.watches_host_sharing else None


def cycle_complete(paths: RunPaths, experiment_id: str) -> bool:
    """A cycle is complete when its result.json is a valid run result of this experiment."""
    if not paths.result.is_file():
        return False
    try:
        document = artifacts.read_json_artifact(paths.result, "run_result")
    except Exception as exc:  # a damaged file is measured again, and said so
        log.warning("%s is unreadable (%s): measuring that cycle again", paths.result, exc)
        return False
    return document["data"].get("experiment_id") == experiment_id


def _share_in_windows(windows_s: float, total_s: float) -> float | None:
    return windows_s / total_s if total_s > 0 else None


class _Timing:
    """Where the job's wall time went: setup phases, windows, and the rest (gaps)."""

    def __init__(self) -> None:
        self.started_s = clock.now()
        self.started_unix_s = self.started_s + clock.wall_offset_s()
        self.phases_s: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.phases_s[phase] = self.phases_s.get(phase, 0.0) + float(seconds)

    def describe(self) -> dict[str, Any]:
        total = clock.now() - self.started_s
        accounted = sum(self.phases_s.values())
        windows = self.phases_s.get("windows", 0.0)
        return {
            "started_unix_s": self.started_unix_s,
            "total_s": total,
            "phases_s": dict(self.phases_s),
            "other_s": max(total - accounted, 0.0),
            "windows_s": windows,
            "share_in_windows": _share_in_windows(windows, total),
        }


def measure_experiment(run: ExperimentRun, cycles: Sequence[int]) -> dict[str, Any]:
    """Measure `cycles` of one experiment in this process (load and warm up once). Returns the job's
    time accounting and each cycle's status. Cycles already complete are skipped."""
    experiment = run.experiment
    p = experiment.parameters
    todo = [c for c in cycles if not cycle_complete(RunPaths.in_dir(cycle_dir(run.experiment_dir, c)), experiment.id)]
    timing = _Timing()
    if not todo:
        log.info("experiment %s: cycles %s already complete", experiment.id, list(cycles))
        return {"timing": timing.describe(), "measured_cycles": []}
    settings = EnergySettings.from_config(run.energy_config)
    devices = hardware.visible_gpus()
    session = EnergySession(settings, devices=devices, baseline_path=run.baseline_path)
    setup_windows: list[dict[str, Any]] = []
    gpu_state = {"start": hardware.describe_gpus(devices), "end": []}  # temperatures, clocks, limits
    backend: Backend | None = None
    log.info(
        "experiment %s: cycles %s, %d prompts, GPUs visible: %s",
        experiment.id,
        todo,
        len(run.prompts),
        [d.uuid for d in devices] or "none",
    )

    def setup_window(name: str, work: Callable[[], Any]) -> Any:
        handle = session.open_window(name)
        value = work()
        if backend is not None:
            backend.synchronize()
        record = session.close_window(handle)
        setup_windows.append(record)
        timing.add(name, record["duration_s"])
        return value

    session.start()
    try:
        t0 = clock.now()
        static_baseline = session.ensure_baseline()
        timing.add("baseline", clock.now() - t0)
        try:
            backend = create_backend(
                experiment.backend, backend_settings(experiment, run.compile_cache_dir, run.experiment_dir)
            )
            require_cuda_untouched(experiment)
            load_report = setup_window(
                "model_load",
                lambda: backend.load(run.model_dir, p["dtype"], max_model_len(experiment), p["batch_size"]),
            )
            # Only the GPUs holding this job's engine are measured (an attached server names its own).
            session.bind_to_process_gpus(backend.measured_gpus(devices))
            measured = select_requests(backend.tokenize(run.prompts, p["max_input_tokens"]), experiment)
            batches = batches_of(measured, experiment)
            first_decoding = decoding_settings(experiment, todo[0])
            # Under a request rate there is no prefill-only window (see _measure_cycle): nothing to warm for it.
            phase_split = settings.phase_split if experiment.load is None else "off"
            placed = {
                **(run.placement or {}),
                "topology": topology.describe(
                    devices,
                    run.placement,
                    [{"role": "harness", "pid": os.getpid(), "gpus": [d.uuid for d in devices]}, *backend.processes()],
                    session.compute_processes(),
                ),
            }
            compile_facts = setup_window("compile", lambda: backend.compile(batches, first_decoding))
            warmup = setup_window(
                "warmup",
                lambda: warm_up(
                    backend,
                    batches,
                    p["batch_size"],
                    first_decoding,
                    experiment.warmup,
                    prefill_only(first_decoding) if phase_split == "differential" else None,
                ),
            )
            t0 = clock.now()
            active_baseline = _active_idle_baseline(session, settings)
            timing.add("baseline", clock.now() - t0)
            statuses = []
            busy_until_s = None  # the baseline just ran: the first cycle rewarms
            for cycle in todo:
                result, busy_until_s = _measure_cycle(
                    run,
                    cycle,
                    measured,
                    batches,
                    session,
                    backend,
                    devices,
                    load_report,
                    compile_facts,
                    warmup,
                    setup_windows,
                    {"static_idle": static_baseline, "active_idle": active_baseline},
                    gpu_state,
                    phase_split,
                    timing,
                    busy_until_s,
                    placed,
                )
                statuses.append({"cycle": cycle, "status": result["status"]})
        except BackendError as exc:
            log.error("experiment %s failed: %s", experiment.id, exc)
            session.stop()
            gpu_state["end"] = hardware.describe_gpus(devices)
            statuses = []
            for cycle in todo:
                paths = RunPaths.in_dir(cycle_dir(run.experiment_dir, cycle))
                if cycle_complete(paths, experiment.id):
                    continue
                _write_failed(run, cycle, str(exc), setup_windows, session, gpu_state, paths)
                statuses.append({"cycle": cycle, "status": "failed"})
    finally:
        session.stop()
        if backend is not None:
            backend.close()
    return {"timing": timing.describe(), "measured_cycles": statuses}


def require_cuda_untouched(experiment: Experiment) -> None:
    """A backend that declares the harness must not create a CUDA context before its engine starts
    (Backend.execution: its engine's own processes create it) is refused one that exists already."""
    if placement.execution_of(experiment).harness_may_init_cuda:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise BackendError(
            f"backend '{experiment.backend}' starts its engine in processes of its own, which need "
            "the first CUDA context, but this process created one before the engine started"
        )


def _active_idle_baseline(session: EnergySession, settings: EnergySettings) -> dict[str, Any] | None:
    """Idle power in the measured power state (model resident, CUDA context held, after warm-up);
    net energy of the cycles uses it. energy.baseline.duration_s: 0 skips both baselines."""
    duration_s = settings.baseline.duration_s
    if duration_s == 0:
        return None
    record = session.measure_active_idle(duration_s)
    session.use_baseline(record)
    return record


def window_pace(
    window: MeasuredWindow, under_load: bool, tolerance: float
) -> tuple[dict[str, float | None], dict[str, str], set[str]]:
    """The window's pace metrics (llm_energy.metrics.repeat_pace) and PACE_FLAG_VARIED where the repeats'
    CV exceeds `tolerance` (campaign.warmup.tolerance: the agreement warm-up asked of batch times)."""
    if under_load:
        reason = "under a request rate the schedule, not the engine, sets when each repeat starts and ends"
        return dict.fromkeys(metrics.PACE_METRICS), {"repeat_time_unavailable_reason": reason}, set()
    pace, info = metrics.repeat_pace(window.requests, window.repeat_of_request)
    cv = pace["repeat_time_cv_in_window"]
    return pace, info, {PACE_FLAG_VARIED} if cv is not None and cv > tolerance else set()


def _measure_cycle(
    run: ExperimentRun,
    cycle: int,
    measured: list[Request],
    batches: list[list[Request]],
    session: EnergySession,
    backend: Backend,
    devices: list[hardware.GpuDevice],
    load_report: Any,
    compile_facts: dict[str, Any],
    warmup: WarmupResult,
    setup_windows: list[dict[str, Any]],
    baselines: dict[str, Any],
    gpu_state: dict[str, Any],
    phase_split: str,
    timing: _Timing,
    busy_until_s: float | None,
    placed: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], float]:
    """Measure one cycle and write its artifacts. Returns the result and when the GPU last worked
    (the end of the cycle's last window), which decides whether the next cycle rewarms."""
    experiment = run.experiment
    p = experiment.parameters
    paths = RunPaths.in_dir(cycle_dir(run.experiment_dir, cycle))
    decoding = decoding_settings(experiment, cycle)
    log.info("cycle %d: measuring %d requests, window at least %.1f s", cycle, len(measured), experiment.min_window_s)
    t0 = clock.now()
    idle_before_s = None if busy_until_s is None else t0 - busy_until_s
    rewarmed = needs_rewarm(busy_until_s, t0)
    if rewarmed:
        rewarm(backend, batches, p["batch_size"], decoding)
        timing.add("warmup", clock.now() - t0)
    host_share = run.host_share_watch()
    if experiment.load is not None:
        window = measure_load_window(
            session,
            backend,
            measured,
            decoding,
            experiment.load,
            experiment.min_window_s,
            load_seed(experiment, cycle),
            host_share,
        )
    else:
        window = measure_window(
            session, backend, "inference", measured, p["batch_size"], decoding, experiment.min_window_s, host_share
        )
    timing.add("windows", window.record["duration_s"])
    phases: dict[str, Any]
    prefill = None
    if phase_split == "differential":
        prefill = measure_window(
            session,
            backend,
            "prefill_only",
            measured,
            p["batch_size"],
            prefill_only(decoding),
            experiment.min_window_s,
            host_share,
        )
        timing.add("windows", prefill.record["duration_s"])
        phases = differential_phases(window, prefill)
    last = prefill or window
    busy_until_s = last.record["end_s"]
    if experiment.load is not None:
        phases = {
            "available": False,
            "method": "off",
            "reason": "under a request rate: a prefill-only pass would not see the same batches (energy.phase_split "
            "applies to static batches)",
        }
    elif phase_split != "differential":
        phases = {"available": False, "method": "off", "reason": "energy.phase_split: off"}
    # Collected once, after both windows: the timeline split and the cycle's timeline.parquet.
    timeline = session.timeline_frame()
    under_load = None
    if experiment.load is not None:
        from llm_energy.energy.attribution import load_window_results

        under_load = load_window_results(
            window.requests, timeline, window.record, experiment.load.max_concurrency, experiment.slo
        )
    if phase_split in ("timeline", "differential"):
        from llm_energy.energy.phases import split_prefill_decode

        timeline_split = split_prefill_decode(timeline, window.record, _prefill_spans(window.requests))
        if phase_split == "timeline":
            phases = {**timeline_split, "method_name": "timeline"}
        else:
            phases["timeline_estimate"] = timeline_split
    gpu_state = {**gpu_state, "end": hardware.describe_gpus(devices)}

    run_metrics, info = metrics.run_metrics(window.requests, window.record, setup_windows, phases)
    for key, value in window.memory.items():
        if isinstance(value, (int, float)) or value is None:
            run_metrics[f"memory_{key}"] = value
    info["engine_path"] = backend.engine_path
    flags = set(window.record.get("flags", []))
    pace, pace_info, pace_flags = window_pace(
        window, under_load=experiment.load is not None, tolerance=WarmupSpec.of(experiment.warmup).tolerance
    )
    run_metrics.update(pace)
    info.update(pace_info)
    flags |= pace_flags
    host_metrics, host_info = host_cpu.window_metrics(window.record["host_cpu"])
    run_metrics.update(host_metrics)
    info.update(host_info)
    if under_load is not None:
        run_metrics.update(under_load["metrics"])
        info.update(under_load["info"])
        flags |= set(under_load["flags"])
    if warmup.converged is False:
        flags.add(WARMUP_FLAG_NOT_CONVERGED)
    flags |= set(phases.get("flags", []))
    flags = sorted(flags)
    first_submitted, last_finished = metrics.window_bounds(window.requests)
    result = {
        "experiment_id": experiment.id,
        "cycle": cycle,
        "status": "ok",
        "error": None,
        "experiment": {**_experiment_record(experiment), "engine_path": backend.engine_path},
        "load": {"device": load_report.device, "dtype": load_report.dtype, "details": load_report.details},
        "setup": {
            "duration_s": sum(w["duration_s"] for w in setup_windows),
            "windows": setup_windows,
            "shared_by_cycles": True,
            "baseline": baselines,
            "compile": compile_facts,
            "warmup": warmup.describe(experiment.warmup),
        },
        "window": {
            **window.record,
            "start_unix_s": window.record["start_s"] + clock.wall_offset_s(),
            "first_request_submitted_s": first_submitted,
            "last_token_received_s": last_finished,
            "min_window_s": experiment.min_window_s,
            "rewarmed": rewarmed,
            "idle_before_s": idle_before_s,
            "compilation_count": {"before": window.compilations[0], "after": window.compilations[1]},
        },
        "memory": window.memory,
        "tokens": {
            "requests": len(window.requests),
            "input_tokens": int(run_metrics["input_tokens"]),
            "output_tokens": int(run_metrics["output_tokens"]),
            "repeats": window.repeats,
            "distinct_requests": len(measured),
        },
        "metrics": run_metrics,
        "metrics_info": info,
        "phases": phases,
        "energy_sources": session.describe(),
        "gpu_state": gpu_state,
        "validity": {"flags": flags, "valid": not invalidating_flags(flags)},
    }
    if under_load is not None:
        result["serving"] = under_load["record"]
    if placed is not None:
        result["placement"] = placed
    _write_cycle(paths, result, window, timeline, run.provenance, under_load["per_request"] if under_load else None)
    log.info(
        "cycle %d done: %.1f output tokens/s, window %.2f s (%d repeats), flags %s",
        cycle,
        run_metrics["output_tokens_per_s"] or 0,
        window.record["duration_s"],
        window.repeats,
        flags or "none",
    )
    return result, busy_until_s


def _write_cycle(
    paths: RunPaths,
    result: dict[str, Any],
    window: MeasuredWindow,
    timeline: pd.DataFrame,
    provenance: dict[str, Any],
    per_request: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    paths.result.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_table_artifact(
        paths.requests,
        "requests_table",
        requests_frame(window.requests, window.repeat_of_request, per_request),
        provenance,
    )
    artifacts.write_table_artifact(paths.timeline, "timeline_table", timeline, provenance)
    # The result is written last: its presence marks a complete cycle.
    artifacts.write_json_artifact(paths.result, "run_result", result, provenance)


def _write_failed(
    run: ExperimentRun,
    cycle: int,
    error: str,
    setup: list[dict],
    session: EnergySession,
    gpu_state: dict,
    paths: RunPaths,
) -> None:
    experiment = run.experiment
    result = {
        "experiment_id": experiment.id,
        "cycle": cycle,
        "status": "failed",
        "error": error,
        "experiment": _experiment_record(experiment),
        "load": None,
        "setup": {"duration_s": sum(w["duration_s"] for w in setup), "windows": setup},
        "window": None,
        "tokens": None,
        "metrics": {},
        "metrics_info": {},
        "phases": None,
        "energy_sources": session.describe(),
        "gpu_state": gpu_state,
        "validity": {"flags": ["failed"], "valid": False},
    }
    paths.result.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_table_artifact(paths.requests, "requests_table", requests_frame([]), run.provenance)
    artifacts.write_table_artifact(paths.timeline, "timeline_table", session.timeline_frame(), run.provenance)
    artifacts.write_json_artifact(paths.result, "run_result", result, run.provenance)


# ---------------------------------------------------------------------------------------------
# The job: every cycle in this process, or each in a fresh one


def measure_cycles_isolated(run_args: dict[str, Any], cycles: Sequence[int]) -> dict[str, Any]:
    """campaign.cycle_isolation: process: one fresh process per cycle (load, compile, warm-up and
    baseline each time), for studies of load-to-load variance."""
    timings = []
    statuses = []
    for cycle in cycles:
        payload = json.dumps({**run_args, "cycles": [cycle]})
        completed = subprocess.run(
            [sys.executable, "-m", "llm_energy.measure_process"],
            input=payload,
            text=True,
            capture_output=True,
            env=dict(os.environ),
        )
        sys.stderr.write(completed.stderr)
        if completed.returncode != 0:
            raise RuntimeError(
                f"the process measuring cycle {cycle} exited with {completed.returncode}: {completed.stderr[-2000:]}"
            )
        report = json.loads(completed.stdout.strip().splitlines()[-1])
        timings.append(report["timing"])
        statuses.extend(report["measured_cycles"])
    return {"timing": combine_timings(timings), "measured_cycles": statuses}


def combine_timings(timings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    phases: dict[str, float] = {}
    for t in timings:
        for name, seconds in t["phases_s"].items():
            phases[name] = phases.get(name, 0.0) + seconds
    total = sum(t["total_s"] for t in timings)
    windows = phases.get("windows", 0.0)
    return {
        "started_unix_s": min((t["started_unix_s"] for t in timings), default=None),
        "total_s": total,
        "phases_s": phases,
        "other_s": sum(t["other_s"] for t in timings),
        "windows_s": windows,
        "share_in_windows": _share_in_windows(windows, total),
        "processes": len(timings),
    }


def count_startup(timing: Mapping[str, Any], startup_s: float) -> dict[str, Any]:
    """The job's timing with its process's startup (interpreter, imports, config validation: the GPU
    is held but idle) counted as phase `startup` and in total_s, so the share in windows is of the
    whole job, not only of the part after measuring began."""
    startup_s = max(float(startup_s), 0.0)
    total = timing["total_s"] + startup_s
    out = dict(timing)
    out["phases_s"] = {"startup": startup_s, **timing["phases_s"]}
    out["total_s"] = total
    if out.get("started_unix_s") is not None:
        out["started_unix_s"] -= startup_s
    out["share_in_windows"] = _share_in_windows(timing["windows_s"], total)
    return out


def job_provenance() -> dict[str, Any]:
    """Scheduler facts (SLURM job id etc.) for the run artifacts."""
    keys = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}
