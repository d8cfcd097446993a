"""The report's pages: units from column names, flags with their meanings, provenance of the runs."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from llm_energy import provenance, report, synthetic
from llm_energy.energy.validity import FLAG_DESCRIPTIONS
from llm_energy.summary import build_tables


class Tables(HTMLParser):
    """Cells of every table, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.current = dict(attrs).get("id", f"table{len(self.tables)}")
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.current:
            self.tables[self.current][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def tables_of(page: str) -> dict[str, list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


@pytest.mark.parametrize(
    "column, unit",
    [
        ("gpu_energy_per_output_token_j", "J/output token"),
        ("gpu_energy_per_output_token_j_ci95_low", "J/output token"),
        ("gpu_energy_j", "J"),
        ("setup_model_load_gpu_energy_j", "J"),
        ("gpu_mean_power_w", "W"),
        ("ttft_p50_s", "s"),
        ("job_wall_s", "s"),
        ("output_tokens_per_s", "tokens/s"),
        ("gpu_output_tokens_per_j", "output tokens/J"),
        ("achieved_flops_per_s", "FLOP/s"),
        ("gpu_flops_per_j", "FLOP/J"),
        ("memory_peak_allocated_bytes", "bytes"),
        ("ttft_n", "count"),
        ("mfu", "ratio (0-1)"),
        ("output_tokens_per_s_cv", "ratio (std/mean)"),
        ("emissions_kg_co2eq", "kg CO2eq"),
        ("gpu_prefill_energy_per_input_token_j", "J/input token"),
        ("batch_size", "requests"),
        ("model", "-"),
    ],
)
def test_units_come_from_the_column_names(column: str, unit: str) -> None:
    assert report.unit_of(column) == unit


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("tree")
    synthetic.write_tree(root, 4, cycles=1)
    summary = build_tables(sorted((root / "experiments").glob("*.json"))).summary
    summary.loc[0, "flags"] = "short_window;warmup_not_converged"
    return root, summary


def test_summary_page_has_every_experiment_and_the_units(tree) -> None:
    _, summary = tree
    tables = tables_of(report.summary_page(summary))
    main = tables["summary-table"]
    assert len(main) == 1 + len(summary)
    header = main[0]
    assert "gpu_energy_per_output_token_j[J/output token]" in header and "ttft_p50_s[s]" in header
    assert "backend_variant[-]" in header  # shown: the synthetic campaign has variants
    units = dict(tables["summary-units"][1:])
    assert len(units) == len(summary.columns) and units["job_wall_s"] == "s"


def test_flags_page_gives_every_flag_its_meaning_and_who_carries_it(tree) -> None:
    _, summary = tree
    rows = {r[0]: r for r in tables_of(report.flags_page(summary))["flags-table"][1:]}
    assert set(FLAG_DESCRIPTIONS) <= set(rows) and "warmup_not_converged" in rows
    assert rows["short_window"][3] == "1" and summary.loc[0, "experiment_id"] in rows["short_window"][4]
    assert rows["power_throttled"][2] == "operating condition (run stays valid)"
    assert rows["short_window"][2] == "makes the energy figure unreliable"
    assert all(r[1] and r[1] != "(no description recorded)" for r in rows.values())


def test_provenance_page_names_software_gpus_and_commit(tree) -> None:
    root, summary = tree
    rendered = provenance.collect(include_gpus=False)
    page = report.provenance_page(summary, {}, root / "runs", rendered)
    tables = tables_of(page)
    assert f"found for {len(summary)} of {len(summary)} experiments" in page
    assert tables["gpus"][1][0] == synthetic.GPU_NAME
    assert tables["code"][0][:2] == ["package_version", "git_commit"]
    assert "python" in tables["rendered"][0] and "git_commit" in tables["rendered"][0]
    # without runs/, the page says so rather than inventing provenance
    assert "found for 0 of" in report.provenance_page(summary, {}, root / "absent", rendered)
