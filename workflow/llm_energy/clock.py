"""The one clock every measurement uses.

Backends stamp request events, the power sampler stamps samples and the harness opens and closes
windows with `now()`, so all timestamps of a run are directly comparable (monotonic, seconds).
`wall_offset_s` converts them to Unix time for reports.
"""

import time


def now() -> float:
    """Monotonic time in seconds (CLOCK_MONOTONIC through perf_counter)."""
    return time.perf_counter()


def wall_offset_s() -> float:
    """Add this to a `now()` value to get Unix time in seconds."""
    return time.time() - time.perf_counter()
