"""GPU peak figures per precision class, and MFU and MBU against them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# ---------------------------------------------------------------------------------------------
# Peak figures, MFU and MBU

_DATASHEET = "vendor datasheet, dense"

# Matched against NVML's device name in this order (most specific first), case-insensitively.
# flops_per_s per precision class; dense tensor-core figures (sparsity halves the datasheet numbers),
# "fp32" is the non-tensor-core FP32 rate a float32 matmul gets without TF32.
PEAK_FIGURES: dict[str, dict[str, Any]] = {
    "H100 NVL": {
        "match": ("H100 NVL",),
        "flops_per_s": {
            "bf16": 835.5e12,
            "fp16": 835.5e12,
            "tf32": 417.5e12,
            "fp32": 60e12,
            "fp8": 1670.5e12,
        },
        "memory_bytes_per_s": 3.9e12,
        "source": _DATASHEET,
    },
    "H100 PCIe": {
        "match": ("H100 PCIE",),
        "flops_per_s": {
            "bf16": 756e12,
            "fp16": 756e12,
            "tf32": 378e12,
            "fp32": 51.2e12,
            "fp8": 1513e12,
        },
        "memory_bytes_per_s": 2.0e12,
        "source": _DATASHEET,
    },
    "H100 SXM": {
        "match": ("H100 SXM", "H100 80GB HBM3", "H100 HBM3"),
        "flops_per_s": {
            "bf16": 989.4e12,
            "fp16": 989.4e12,
            "tf32": 494.7e12,
            "fp32": 66.9e12,
            "fp8": 1978.9e12,
        },
        "memory_bytes_per_s": 3.35e12,
        "source": _DATASHEET,
    },
    "H200 NVL": {
        "match": ("H200 NVL",),
        "flops_per_s": {
            "bf16": 835.5e12,
            "fp16": 835.5e12,
            "tf32": 417.5e12,
            "fp32": 60e12,
            "fp8": 1670.5e12,
        },
        "memory_bytes_per_s": 4.8e12,
        "source": _DATASHEET,
    },
    "H200": {
        "match": ("H200",),
        "flops_per_s": {
            "bf16": 989.4e12,
            "fp16": 989.4e12,
            "tf32": 494.7e12,
            "fp32": 66.9e12,
            "fp8": 1978.9e12,
        },
        "memory_bytes_per_s": 4.8e12,
        "source": _DATASHEET,
    },
    "A100 SXM 40GB": {
        "match": ("A100-SXM4-40GB", "A100 SXM4 40GB"),
        "flops_per_s": {
            "bf16": 312e12,
            "fp16": 312e12,
            "tf32": 156e12,
            "fp32": 19.5e12,
        },
        "memory_bytes_per_s": 1.555e12,
        "source": _DATASHEET,
    },
    "A100 SXM": {
        "match": ("A100-SXM", "A100 SXM"),
        "flops_per_s": {
            "bf16": 312e12,
            "fp16": 312e12,
            "tf32": 156e12,
            "fp32": 19.5e12,
        },
        "memory_bytes_per_s": 2.039e12,
        "source": _DATASHEET,
    },
    "L40S": {
        "match": ("L40S",),
        "flops_per_s": {
            "bf16": 362e12,
            "fp16": 362e12,
            "tf32": 183e12,
            "fp32": 91.6e12,
            "fp8": 733e12,
        },
        "memory_bytes_per_s": 0.864e12,
        "source": _DATASHEET,
    },
}

_PRECISION_CLASS = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "fp32": "fp32",
    "tf32": "tf32",
    "float8": "fp8",
    "fp8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


def peak_figures(gpu_name: str | None, dtype: str) -> dict[str, Any] | None:
    """Peak dense FLOP/s for `dtype` and memory bandwidth of a GPU named as NVML names it.

    None when the GPU or the precision is not in PEAK_FIGURES (MFU/MBU are then unavailable).
    """
    if not gpu_name:
        return None
    precision = _PRECISION_CLASS.get(str(dtype).lower().removeprefix("torch."))
    normalized = re.sub(r"[\s_]+", " ", gpu_name.upper())
    for model, entry in PEAK_FIGURES.items():
        if any(pattern.upper() in normalized for pattern in entry["match"]):
            flops = entry["flops_per_s"].get(precision) if precision else None
            if flops is None:
                return None
            return {
                "gpu_model": model,
                "dtype": precision,
                "flops_per_s": flops,
                "memory_bytes_per_s": entry["memory_bytes_per_s"],
                "source": entry["source"],
            }
    return None


def _peak_value(peak: float | Mapping[str, Any] | None, key: str) -> float | None:
    if isinstance(peak, Mapping):
        peak = peak.get(key)
    return float(peak) if peak is not None else None


def mfu(flops: float | None, seconds: float | None, peak: float | Mapping[str, Any] | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over peak FLOP/s (a peak_figures dict or a number)."""
    peak_flops = _peak_value(peak, "flops_per_s")
    if flops is None or not seconds or seconds <= 0 or not peak_flops or peak_flops <= 0:
        return None
    return float(flops) / float(seconds) / peak_flops


def mbu(bytes_moved: float | None, seconds: float | None, peak: float | Mapping[str, Any] | None) -> float | None:
    """Memory bandwidth utilization: bytes moved per second over peak memory bandwidth."""
    peak_bandwidth = _peak_value(peak, "memory_bytes_per_s")
    if bytes_moved is None or not seconds or seconds <= 0 or not peak_bandwidth or peak_bandwidth <= 0:
        return None
    return float(bytes_moved) / float(seconds) / peak_bandwidth
