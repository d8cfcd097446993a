"""The serving figure: latency percentiles, energy per output token and goodput against the request rate,
from a summary of experiments under load; a campaign without rates gets the note instead."""

from __future__ import annotations

import numpy as np
import pandas as pd
from llm_energy import plots
from llm_energy.plots import serving


def summary(rates=(2.0, 6.0), backends=("openai_server", "vllm")) -> pd.DataFrame:
    rows = []
    for backend in backends:
        for rate in rates:
            rows.append(
                {
                    "experiment_id": f"m.{backend}.d.rate{rate:g}.0000000{len(rows)}",
                    "model": "m",
                    "dataset": "d",
                    "backend": backend,
                    "backend_variant": None,
                    "engine_path": "default",
                    "status": "ok",
                    "batch_size": 4,
                    "dtype": "float32",
                    "flags": "",
                    "gpu_name": "NVIDIA H200",
                    "gpu_count": 1,
                    "request_rate_per_s": rate,
                    "max_concurrency": None,
                    "ttft_p50_s": 0.02 * rate,
                    "ttft_p90_s": 0.04 * rate,
                    "tpot_p50_s": 0.005,
                    "tpot_p90_s": 0.007,
                    "request_throughput_per_s": 0.9 * rate,
                    "goodput_requests_per_s": 0.7 * rate,
                    "steady_state_gpu_energy_per_output_token_j": 1.0 / rate,
                    "gpu_energy_per_output_token_j": 1.2 / rate,
                    "gpu_energy_method": "measured",
                    "gpu_energy_source": "nvml_energy_counter",
                    "slo_ttft_s": "0.5",
                    "slo_tpot_s": "0.1",
                }
            )
    return pd.DataFrame(rows)


def test_the_figure_draws_one_line_per_series_against_the_rate_in_every_panel() -> None:
    figure = serving.draw_serving(plots.FigureInputs(summary()), "t")
    axes = figure.get_axes()
    assert len(axes) == 4
    for ax in axes:
        assert ax.get_xlabel().startswith("Request rate")
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert lines and all(list(line.get_xdata()) == [2.0, 6.0] for line in lines)
    energy = axes[2]
    assert "steady state" in energy.get_ylabel()
    np.testing.assert_allclose(sorted({y for line in energy.get_lines() for y in line.get_ydata()}), [1 / 6, 0.5])
    notes = " ".join(t.get_text() for t in figure.texts)
    assert "TTFT <= 0.5 s" in notes and "TPOT <= 0.1 s" in notes


def test_without_steady_state_energy_the_window_energy_is_shown_and_labelled() -> None:
    frame = summary().drop(columns=["steady_state_gpu_energy_per_output_token_j"])
    figure = serving.draw_serving(plots.FigureInputs(frame), "t")
    assert "whole window" in figure.get_axes()[2].get_title()


def test_a_campaign_without_request_rates_gets_the_note() -> None:
    frame = summary()
    frame["request_rate_per_s"] = np.nan  # static batches
    figure = serving.draw_serving(plots.FigureInputs(frame), "t")
    assert any(serving.NO_RATES_TEXT in t.get_text() for ax in figure.get_axes() for t in ax.texts)
