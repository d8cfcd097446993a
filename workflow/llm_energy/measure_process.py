"""One fresh process measuring some cycles of one experiment (campaign.cycle_isolation: process).

Reads the job's arguments as JSON on stdin, logs to stderr, and prints its report as the last line
of stdout. `python -m llm_energy.measure_process` is started by measure.measure_cycles_isolated.
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> int:
    from llm_energy import jobs, measure

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    arguments = json.loads(sys.stdin.read())
    cycles = arguments.pop("cycles")
    run, _ = jobs.experiment_run(**arguments)
    report = measure.measure_experiment(run, cycles)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


# The guard matters: vLLM's engine core runs in a spawned subprocess, which re-imports this module.
if __name__ == "__main__":
    sys.exit(main())
