"""A non-editable install carries everything the package reads at run time: the JSON Schemas and
the bundled prompts. Built as a real wheel, installed into a folder, imported from elsewhere."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "workflow" / "llm_energy"


def test_every_subpackage_is_listed_in_pyproject():
    # The packages are listed by hand (see pyproject.toml); a new subpackage left out of the list
    # would be missing from every wheel.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from pyproject.toml: {sorted(found - listed)}"
    assert "llm_energy.schemas" in listed


def test_a_wheel_validates_configs_and_artifacts_outside_the_source_tree(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the folder it builds.
    source = tmp_path / "source"
    for part in ("pyproject.toml", "README.md"):
        (source / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, source / part)
    for part in ("workflow/llm_energy", "workflow/schemas"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("llm_energy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    schemas = sorted(p.name for p in (ROOT / "workflow" / "schemas").glob("*.schema.json"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("llm_energy/schemas/")) == schemas
    assert "llm_energy/data/bundled_prompts.jsonl" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = (
        "import llm_energy.artifacts as a, llm_energy.config_schema as c, llm_energy.datasets as d\n"
        f"assert a.SCHEMA_DIR == __import__('pathlib').Path({str(target)!r}).resolve() / 'llm_energy' / 'schemas', a.SCHEMA_DIR\n"
        "assert c.CONFIG_SCHEMA_PATH.is_file() and d.BUNDLED_PROMPTS_PATH.is_file()\n"
        "try:\n"
        "    a.validate_data('dataset_manifest', {'name': 1}, where='probe')\n"
        "except Exception as exc:\n"
        "    assert 'probe' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('an invalid manifest passed')\n"
    )
    # Only the installed copy may be importable: no source tree on the path, cwd outside it.
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
