"""Run the real snakemake on a copy of the workflow in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# Figures printed at the end of the test session (see tests/conftest.py).
MEASURED_TIMES_S: dict[str, float] = {}


def copy_workflow(dest: Path) -> Path:
    """The files a user has: Snakefile, workflow/, config/, envs/ (no results, no resources)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / "Snakefile", dest / "Snakefile")
    for folder in ("workflow", "config", "envs"):
        shutil.copytree(REPO_ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "CODECARBON_LOG_LEVEL": "error",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def no_controller_slurm_conf() -> dict[str, str]:
    """SLURM_CONF for snakemake runs that never use SLURM. Snakemake's SLURM executor plugin builds its
    help text at every start and runs `scontrol show config` for it; where SLURM's client tools are
    installed (CI installs them for the SLURM test) but no controller runs, that call waits about 9 s,
    on every snakemake start of the suite. A configuration naming a controller and nothing else makes
    it fail at once. tests/workflow/test_slurm.py runs its own snakemake with the real configuration."""
    if shutil.which("scontrol") is None:
        return {}
    path = Path(tempfile.gettempdir()) / "llm-energy-tests-no-slurm-controller.conf"
    if not path.is_file():
        path.write_text("ClusterName=none\nSlurmctldHost=localhost\nMessageTimeout=1\n")
    return {"SLURM_CONF": str(path)}


def run_snakemake(
    workdir: Path, *args: str, timeout_s: float = 900, label: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    completed = subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=test_environment({**no_controller_slurm_conf(), **(env or {})}),
    )
    if label:
        MEASURED_TIMES_S[label] = time.perf_counter() - start
    return completed


def run_campaign(workdir: Path, config: dict, label: str) -> pd.DataFrame:
    """Write `config` as the campaign file of `workdir`, run it with the real snakemake on 2 cores,
    and return its summary.csv."""
    import pandas as pd
    import yaml

    campaign = workdir / "campaign.yaml"
    campaign.write_text(yaml.safe_dump(config))
    completed = run_snakemake(workdir, "--cores", "2", "--configfile", str(campaign), label=label)
    assert completed.returncode == 0, describe(completed)
    return pd.read_csv(workdir / "results" / "summary.csv")


def describe(completed: subprocess.CompletedProcess) -> str:
    return f"exit {completed.returncode}\n--- stdout ---\n{completed.stdout[-6000:]}\n--- stderr ---\n{completed.stderr[-6000:]}"
