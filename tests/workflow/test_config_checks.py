"""Workflow-level checks that need no inference: lint, dry-runs of every shipped config, broken configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.workflow.helpers import REPO_ROOT, copy_workflow, describe, run_snakemake

pytestmark = pytest.mark.workflow
SHIPPED_CONFIGS = [REPO_ROOT / "config" / "config.yaml", *sorted((REPO_ROOT / "config" / "campaigns").glob("*.yaml"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("checks"))


def test_lint_is_clean(workdir):
    completed = run_snakemake(workdir, "--lint")
    assert completed.returncode == 0, describe(completed)
    assert "Lints for" not in completed.stdout + completed.stderr, describe(completed)


@pytest.mark.parametrize("config_path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_dry_run_of_every_shipped_config(workdir, config_path):
    completed = run_snakemake(
        workdir, "-n", "--cores", "1", "--configfile", str(workdir / config_path.relative_to(REPO_ROOT))
    )
    assert completed.returncode == 0, describe(completed)
    assert "run_inference" in completed.stdout


BROKEN = {
    "unknown key": ({"grid": {"batch_sise": [1]}}, "grid.batch_sise"),
    "wrong type": ({"grid": {"batch_size": ["eight"]}}, "grid.batch_size[0]"),
    "unknown backend": ({"backends": ["tensorflow"]}, "backends[0]"),
    "missing models": ({"models": None}, "models"),
    "hub model without revision": ({"models": {"m": {"source": "hub", "id": "org/model"}}}, "models.m.revision"),
    "unknown key in a backend variant": (
        {"backend_settings": {"pytorch": {"variants": {"int8": {"quantisation": "fp8"}}}}},
        "backend_settings.pytorch.variants.int8.quantisation",
    ),
    # bitsandbytes 4-bit cannot generate on CPU: refused before any job, the variant's key named
    "backend variant that cannot run here": (
        {
            "backend_settings": {
                "pytorch": {"device": "cpu", "variants": {"none": {}, "nf4": {"quantization": "bnb_4bit"}}}
            }
        },
        "backend_settings.pytorch.variants.nf4.quantization",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_config_fails_with_the_key_named_and_writes_nothing(tmp_path, name):
    change, key = BROKEN[name]
    workdir = copy_workflow(tmp_path / "w")
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    for k, v in change.items():
        if v is None:
            config.pop(k)
        elif isinstance(v, dict) and isinstance(config.get(k), dict) and k != "models":
            config[k].update(v)
        else:
            config[k] = v
    broken = workdir / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    completed = run_snakemake(workdir, "--cores", "1", "--configfile", str(broken))
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert f"config key '{key}'" in output, output
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()
