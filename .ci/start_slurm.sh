#!/usr/bin/env bash
# Start (or reuse) the one-node SLURM cluster that tests/workflow/test_slurm.py submits to.
#   .ci/start_slurm.sh           install slurm-wlm + munge if missing, write /etc/slurm/slurm.conf,
#                                start munged/slurmctld/slurmd, wait (bounded) until the node is idle
#   .ci/start_slurm.sh stop      stop exactly the daemons that earlier starts started
#   .ci/start_slurm.sh status    exit 0 when the node accepts jobs
#   .ci/start_slurm.sh --install-only   only apt-get install slurm-wlm + munge when sbatch is missing
# Needs root (apt-get, /etc/slurm, daemons). The logic lives in tests/slurm_cluster.py (stdlib only),
# which the test's fixture also uses, so CI and the test start the cluster the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "$PYTHON" tests/slurm_cluster.py "$@"
