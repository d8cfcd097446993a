"""The unit of a table column or metric, read from its name.

Every quantity is named with its unit (`_j` joules, `_s` seconds, `_w` watts, `_per_s` per second, ...),
so the unit is never stored beside a number that could disagree with it: the summary table, the long
metrics table (its `unit` column) and the report's pages all take it from here.
"""

from __future__ import annotations

# Unit by name ending, most specific first (statistics suffixes are stripped before).
UNIT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_per_output_token_j", "J/output token"),
    ("_per_input_token_j", "J/input token"),
    ("_per_decode_token_j", "J/decode token"),
    ("output_tokens_per_j", "output tokens/J"),
    ("flops_per_j", "FLOP/J"),
    ("flops_per_s", "FLOP/s"),
    ("tokens_per_s", "tokens/s"),
    ("requests_per_s", "requests/s"),
    ("_kg_co2eq", "kg CO2eq"),
    ("_energy_j", "J"),
    ("_j", "J"),
    ("_w", "W"),
    ("_s", "s"),
    ("_bytes", "bytes"),
    ("_mhz", "MHz"),
    ("_pct", "%"),
    ("_flops", "FLOP"),
    ("_c", "°C"),
)
# Names without a unit suffix: ratios and counts.
UNITLESS = {
    "mfu": "ratio (0-1)",
    "mbu": "ratio (0-1, lower bound)",
    "job_share_in_windows": "ratio (0-1)",
    "timeline_vs_counter_rel_diff": "ratio",
    "repeat_time_cv_in_window": "ratio (std/mean)",
    "repeat_time_spread_in_window": "ratio (max/min - 1)",
    "repeats_in_window": "count",
    "host_cpu_pressure_some_share": "ratio (0-1, of the window's wall time)",
    "host_cpu_steal_share": "ratio (0-1, of the window's CPU time)",
    "batch_size": "requests",
    "cycles_ok": "count",
    "cycles_failed": "count",
    "gpu_count": "count",
    "requests": "count",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
    "max_input_tokens": "tokens",
    "max_output_tokens": "tokens",
    "token_budget": "tokens",
    "temperature": "-",
    "top_p": "-",
    "top_k": "tokens",
    "max_concurrency": "requests",
}
STATISTIC_SUFFIXES = ("_ci95_low", "_ci95_high", "_std", "_cv")


def unit_of(name: str) -> str:
    """The unit of a column or metric, from its name ("-" where it has none: labels, strings)."""
    base = name
    if base.endswith("_cv"):
        return "ratio (std/mean)"
    for suffix in STATISTIC_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base in UNITLESS:
        return UNITLESS[base]
    if base.endswith("_n"):
        return "count"
    for suffix, unit in UNIT_SUFFIXES:
        if base.endswith(suffix):
            return unit
    return "-"
