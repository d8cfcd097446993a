"""RAPL reader on fake powercap trees: zones, wraparound, permission denied, absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_energy.energy.rapl import RaplReader

MAX_UJ = 262_143_328_850


def make_zone(path: Path, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, each with core + dram subzones, and a psys platform zone."""
    root = tmp_path / "powercap"
    make_zone(root / "intel-rapl:0", "package-0", 1_000_000)
    make_zone(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 500_000)
    make_zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 200_000)
    make_zone(root / "intel-rapl:1", "package-1", 3_000_000)
    make_zone(root / "intel-rapl:1" / "intel-rapl:1:0", "dram", 100_000)
    make_zone(root / "intel-rapl:2", "psys", 9_000_000)
    # sysfs lists subzones in the class folder too, as links to the nested folders
    for sub in ("intel-rapl:0/intel-rapl:0:0", "intel-rapl:0/intel-rapl:0:1", "intel-rapl:1/intel-rapl:1:0"):
        (root / sub.split("/")[1]).symlink_to(root / sub)
    return root


def write(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_packages_sum_to_cpu_and_dram_subzones_to_dram(powercap):
    reader = RaplReader(powercap)
    reader.open()
    assert reader.status.available and reader.status.domains == ["cpu", "dram"]
    names = sorted(z.name for z in reader.zones)
    assert names == ["dram", "dram", "package-0", "package-1"]  # core and psys ignored
    start = reader.read_j()
    write(powercap / "intel-rapl:0", 1_000_000 + 2_000_000)  # +2 J
    write(powercap / "intel-rapl:1", 3_000_000 + 1_500_000)  # +1.5 J
    write(powercap / "intel-rapl:0" / "intel-rapl:0:1", 200_000 + 700_000)  # +0.7 J
    write(powercap / "intel-rapl:2", 99_000_000)  # psys must not count
    end = reader.read_j()
    assert end["domains"]["cpu"] - start["domains"]["cpu"] == pytest.approx(3.5)
    assert end["domains"]["dram"] - start["domains"]["dram"] == pytest.approx(0.7)


def test_wraparound_is_corrected_with_max_energy_range(tmp_path):
    root = tmp_path / "powercap"
    zone = make_zone(root / "intel-rapl:0", "package-0", 990, max_uj=1000)
    reader = RaplReader(root)
    reader.open()
    first = reader.read_j()["domains"]["cpu"]
    write(zone, 30)  # wrapped: 990 -> 1000 (=0) -> 30 is 40 uJ
    second = reader.read_j()["domains"]["cpu"]
    write(zone, 500)
    third = reader.read_j()["domains"]["cpu"]
    assert (second - first) * 1e6 == pytest.approx(40)
    assert (third - first) * 1e6 == pytest.approx(510)
    assert reader.domain_reasons["dram"] and "no dram zone" in reader.domain_reasons["dram"]


def test_permission_denied_makes_rapl_unavailable_with_the_fix(powercap):
    denied = powercap / "intel-rapl:0" / "energy_uj"

    def read_text(path: Path) -> str:
        if path == denied:  # tests run as root, where chmod 000 would not stop a read
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    reader = RaplReader(powercap, read_text=read_text)
    reader.open()
    assert not reader.status.available
    reason = reader.domain_reasons["cpu"]
    assert str(denied) in reason and "permission denied" in reason
    assert "run as root or chmod a+r" in reason and "(see README)" in reason


def test_absent_powercap(tmp_path):
    reader = RaplReader(tmp_path / "nothing")
    reader.open()
    assert not reader.status.available
    assert reader.status.reason == f"no RAPL: {tmp_path / 'nothing'} is absent"


def test_this_machine_without_rapl_says_so():
    reader = RaplReader()
    reader.open()
    if not Path("/sys/class/powercap").exists():
        assert reader.status.reason == "no RAPL: /sys/class/powercap is absent"
    else:  # a machine with powercap: either readable zones or a reason naming the file
        assert reader.status.available or reader.status.reason
