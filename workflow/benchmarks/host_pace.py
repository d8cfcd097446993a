"""Whether this host's CPU keeps a steady pace: the bound on any host-bound measurement's spread.

Where the host sets the pace (the fast path at batch 1 and 8, vLLM's engine loop), a window's
throughput can vary no less than the host's own CPU speed varies between windows. This script
measures that speed with no GPU and no engine: each of `--procs` processes runs a fixed chunk of
pure-Python work (dict stores, int-to-str conversions, calls: the interpreter work of a decoding
loop, about 2 ms a chunk) back to back, and counts the chunks it finishes in each window of
`--window-s` seconds. All processes share one window grid on the monotonic clock. Every window
also records what the host took from it (llm_energy.host_cpu: cgroup throttling, CPU pressure,
steal), read by the parent at the window edges.

It prints, per mode and window length (the base window and `--aggregate` multiples of it, summed
from consecutive base windows), the chunks per second of each process, their CV between windows,
the slowest and fastest window relative to the mean, and the host's largest take. An experiment whose
pace this CPU sets inherits a spread of this size at that window length, whatever the harness does.

    python workflow/benchmarks/host_pace.py --windows 45 --window-s 1 --aggregate 3,15 \
        --modes 1,1-pinned,2 --out host_pace.json

Modes: `N` runs N processes where the kernel places them; `N-pinned` pins process i to the i-th
CPU this process may use (os.sched_setaffinity), which removes migrations between CPUs as a cause.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "workflow"))

CHUNK_TARGET_S = 0.002


def work_chunk(iterations: int) -> int:
    """A fixed amount of interpreter work (its result is returned so that nothing is optimised away)."""
    table: dict[int, int] = {}
    total = 0
    for i in range(iterations):
        table[i & 255] = i
        total += len(str(i)) + table.get((i * 7) & 255, 0) % 3
    return total


def calibrate(target_s: float = CHUNK_TARGET_S) -> int:
    """Iterations for a chunk of about `target_s` on this CPU (the median of a few timed runs)."""
    iterations = 1000
    work_chunk(iterations)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        work_chunk(iterations)
        times.append(time.perf_counter() - started)
    per_iteration = sorted(times)[len(times) // 2] / iterations
    return max(100, round(target_s / per_iteration))


def worker(index: int, pin_cpu: int | None, iterations: int, start: float, window_s: float, windows: int, queue):
    """Count the chunks finished in each window of the shared grid (a chunk counts in the window it ends in)."""
    if pin_cpu is not None:
        os.sched_setaffinity(0, {pin_cpu})
    counts = [0] * windows
    end = start + window_s * windows
    while time.monotonic() < start:
        pass
    while True:
        work_chunk(iterations)
        now = time.monotonic()
        if now >= end:
            break
        counts[int((now - start) // window_s)] += 1
    queue.put((index, counts))


def parse_mode(mode: str) -> tuple[int, bool]:
    count, _, pinned = mode.partition("-")
    if not count.isdigit() or int(count) < 1 or pinned not in ("", "pinned"):
        raise SystemExit(f"--modes: {mode!r} is not N or N-pinned (N >= 1), e.g. 1,1-pinned,2")
    return int(count), bool(pinned)


def run_mode(procs: int, pinned: bool, iterations: int, window_s: float, windows: int) -> dict:
    """One mode's windows: chunk counts per process and the host's take per window."""
    from llm_energy import host_cpu

    cpus = sorted(os.sched_getaffinity(0))
    if pinned and procs > len(cpus):
        raise SystemExit(f"--modes: {procs}-pinned needs {procs} CPUs; this process may use {len(cpus)}")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start = time.monotonic() + 1.0  # time for every process to start before the first window
    start_unix_s = time.time() + (start - time.monotonic())
    workers = [
        context.Process(
            target=worker, args=(i, cpus[i] if pinned else None, iterations, start, window_s, windows, queue)
        )
        for i in range(procs)
    ]
    for process in workers:
        process.start()
    host = []
    time.sleep(max(0.0, start - time.monotonic()))
    edge = host_cpu.snapshot()  # at the first window's start, so that each record covers its window alone
    for k in range(1, windows + 1):
        time.sleep(max(0.0, start + k * window_s - time.monotonic()))
        after = host_cpu.snapshot()
        host.append(host_cpu.window_record(edge, after, window_s))
        edge = after
    counts = dict(queue.get() for _ in workers)
    for process in workers:
        process.join()
    return {
        "procs": procs,
        "pinned": pinned,
        # Where the window grid lies, on the clock the pipeline's windows use (time.perf_counter and
        # time.monotonic are both CLOCK_MONOTONIC on Linux) and in Unix time: a run beside an
        # experiment can then be lined up with its windows.
        "start_monotonic_s": start,
        "start_unix_s": start_unix_s,
        "chunks_per_window": [counts[i] for i in range(procs)],
        "host_cpu": host,
    }


def describe_windows(chunks: list[int], window_s: float, factor: int) -> dict:
    """Chunks/s over windows of `factor` consecutive base windows (a partial group at the end is dropped)."""
    from llm_energy.statistics import describe

    groups = len(chunks) // factor
    rates = [sum(chunks[g * factor : (g + 1) * factor]) / (window_s * factor) for g in range(groups)]
    stats = describe(rates)
    mean = stats["mean"]
    return {
        "window_s": window_s * factor,
        "windows": groups,
        "chunks_per_s_mean": mean,
        "chunks_per_s_cv": stats["cv"],
        "slowest_rel": stats["min"] / mean if mean else None,
        "fastest_rel": stats["max"] / mean if mean else None,
    }


def host_take(records: list[dict], window_s: float, factor: int) -> dict:
    """The largest share of a window (at this length) the host took, per counter; None when unavailable."""
    out = {}
    for name, share_of in (("pressure_some", "wall"), ("steal", "cpu")):
        values = [r[f"{name}_s"] for r in records]
        if any(v is None for v in values):
            out[f"{name}_max_share"] = None
            continue
        cpus = records[0]["cpus"] or 1
        scale = window_s * factor * (cpus if share_of == "cpu" else 1)
        sums = [sum(values[g * factor : (g + 1) * factor]) for g in range(len(values) // factor)]
        out[f"{name}_max_share"] = max(sums) / scale if sums else None
    throttled = [r["throttled_s"] for r in records]
    out["throttled_s_total"] = None if any(v is None for v in throttled) else sum(throttled)
    return out


def summarise(mode: dict, window_s: float, factors: list[int]) -> list[dict]:
    rows = []
    name = f"{mode['procs']}{'-pinned' if mode['pinned'] else ''}"
    for factor in factors:
        taken = host_take(mode["host_cpu"], window_s, factor)  # the mode's, the same for each process
        for index, chunks in enumerate(mode["chunks_per_window"]):
            rows.append({"mode": name, "process": index, **describe_windows(chunks, window_s, factor), **taken})
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    print(
        f"{'mode':>10} {'proc':>4} {'window s':>8} {'n':>3} {'chunks/s':>9} {'CV':>7} "
        f"{'slowest':>7} {'fastest':>7} {'pressure max':>12} {'steal max':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:>10} {r['process']:>4} {r['window_s']:>8.1f} {r['windows']:>3} "
            f"{fmt(r['chunks_per_s_mean'], '.1f'):>9} {fmt(r['chunks_per_s_cv'], '.4f'):>7} "
            f"{fmt(r['slowest_rel'], '.3f'):>7} {fmt(r['fastest_rel'], '.3f'):>7} "
            f"{fmt(r['pressure_some_max_share'], '.4f'):>12} {fmt(r['steal_max_share'], '.4f'):>9}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=30, help="base windows per mode (default 30)")
    parser.add_argument("--window-s", type=float, default=1.0, help="base window length in seconds (default 1)")
    parser.add_argument(
        "--aggregate", default="", help="window-length multiples also reported, comma-separated (e.g. 3,15)"
    )
    parser.add_argument("--modes", default="1", help="comma-separated N or N-pinned (default 1)")
    parser.add_argument("--out", type=Path, help="write every window's figures here as JSON")
    args = parser.parse_args(argv)
    if args.windows < 2 or args.window_s <= 0:
        parser.error("--windows must be at least 2 and --window-s positive")
    try:
        factors = [1, *(int(x) for x in args.aggregate.split(",") if x.strip())]
    except ValueError:
        parser.error(f"--aggregate: {args.aggregate!r} is not a comma-separated list of integers")
    if any(f < 1 for f in factors):
        parser.error("--aggregate: every multiple must be at least 1")
    modes = [parse_mode(m.strip()) for m in args.modes.split(",") if m.strip()]
    factors = [f for f in factors if f == 1 or f <= args.windows // 2]  # at least two windows at each length

    iterations = calibrate()
    print(f"host_pace: {iterations} iterations a chunk (about {CHUNK_TARGET_S * 1e3:.0f} ms here)", flush=True)
    results, rows = [], []
    for procs, pinned in modes:
        print(f"host_pace: mode {procs}{'-pinned' if pinned else ''}, {args.windows} x {args.window_s} s", flush=True)
        mode = run_mode(procs, pinned, iterations, args.window_s, args.windows)
        results.append(mode)
        rows.extend(summarise(mode, args.window_s, factors))
    print_table(rows)
    if args.out:
        from llm_energy.artifacts import atomic_write_bytes
        from llm_energy.provenance import host_facts

        payload = {
            "host": host_facts(),
            "iterations_per_chunk": iterations,
            "window_s": args.window_s,
            "modes": results,
            "rows": rows,
        }
        atomic_write_bytes(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
