"""FLOPs per model and dtype, and their application to the requests each cycle measured.

`estimate_model_flops` (the estimate_flops rule) needs only the model: it chooses the cost model
(analytic from the architecture, else fitted to FlopCounterMode counts of the model's own code,
else 2 x parameters), cross-checks it once on the real model (FlopCounterMode, calflops) and returns
the data of a `flops_model` artifact. It needs no measurement, so it runs beside the GPU jobs, once
for every experiment of the model at that dtype. `cycle_flops` applies that cost model to one
cycle's requests table (llm_energy.aggregate calls it for every cycle), so `output_length: eos` and
sampling get each cycle's own FLOPs and a failed cycle takes only its own FLOPs with it. The
parameter count is the model manifest's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm_energy.errors import ArtifactError, ConfigError
from llm_energy.flops.analytic import (
    ArchitectureSpec,
    CostModel,
    bytes_per_param,
    parameter_estimate_flops,
    request_costs,
)
from llm_energy.flops.counted import (
    CROSS_CHECK_SHAPE,
    DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS,
    CrossCheckMode,
    analytic_cross_checks,
    fit_cost_model,
    load_model_config,
)

logger = logging.getLogger(__name__)

# A relative difference at or below this between analytic and FlopCounterMode counts makes the
# analytic estimate "high" confidence.
HIGH_CONFIDENCE_RELATIVE_ERROR = 0.02


# ---------------------------------------------------------------------------------------------
# Per model and dtype (the estimate_flops rule)


def _validated_requests(requests: Any, notes: list[str]) -> list[tuple[int, int]]:
    missing = [c for c in ("input_tokens", "output_tokens") if c not in requests.columns]
    if missing:
        raise ArtifactError(
            f"requests table lacks columns {missing}; estimate_flops needs one row per request with "
            "input_tokens and output_tokens (the run's requests.parquet)"
        )
    frame = requests[["input_tokens", "output_tokens"]]
    complete = frame.dropna()
    if len(complete) < len(frame):
        notes.append(f"{len(frame) - len(complete)} request(s) without token counts were left out.")
    pairs = [(int(i), int(o)) for i, o in complete.itertuples(index=False)]
    bad = [(i, o) for i, o in pairs if i < 1 or o < 0]
    if bad:
        raise ArtifactError(
            f"requests table has {len(bad)} row(s) with input_tokens < 1 or output_tokens < 0, "
            f"e.g. {bad[0]}; re-run the inference that wrote it"
        )
    return pairs


def _decode_steps_min(requests: Any, batch_size: int) -> tuple[int, str]:
    """Fewest decode steps (forwards that each read all weights once) the run can have made.

    With static batches (requests table's batch_index >= 0) a batch decodes until its longest
    request is done: the steps are known. Where the engine schedules requests itself
    (batch_index -1, e.g. vLLM), at most `batch_size` sequences share a step. A window that repeats
    the request set (column `repeat`) runs the passes one after the other: their steps add up.
    """
    frame = requests.dropna(subset=["input_tokens", "output_tokens"])
    if len(frame) == 0:
        return 0, "no requests"
    frame = frame.assign(steps=(frame["output_tokens"].astype("int64") - 1).clip(lower=0))
    passes = frame.groupby(frame["repeat"].to_numpy()) if "repeat" in frame.columns else [(0, frame)]
    static = "batch_index" in frame.columns and bool((frame["batch_index"] >= 0).all())
    total_steps, batches, n_passes = 0, 0, 0
    for _, one_pass in passes:
        n_passes += 1
        if static:
            per_batch = one_pass["steps"].groupby(one_pass["batch_index"].to_numpy()).max()
            total_steps += int(per_batch.sum())
            batches += len(per_batch)
        else:
            steps = one_pass["steps"]
            total_steps += max(int(steps.max()), math.ceil(int(steps.sum()) / batch_size))
    over = f" over {n_passes} passes" if n_passes > 1 else ""
    if static:
        return total_steps, f"{batches} static batches{over}, each until its longest request"
    return total_steps, f"at most {batch_size} sequences per step{over}"


_COUNTING_NOTES = (
    "Matmul FLOPs only (2 per multiply-add): all weight matrices incl. lm_head, plus Q K^T and A V.",
    "Prefill attention counted as the full seq x seq square, as eager/SDPA-math kernels compute it; "
    "flash-style causal kernels execute about half of it.",
    "KV cache: the first output token comes from the prefill; decode step t = 1..output_tokens-1 "
    "attends over input_tokens + t keys.",
    "lm_head on the last prompt position only in prefill (transformers generate passes "
    "logits_to_keep=1; vLLM computes logits only where it samples).",
)


@dataclass
class _CostChoice:
    method: str = "parameter_estimate"
    confidence: str = "low"
    cost: CostModel | None = None
    architecture: ArchitectureSpec | None = None
    model_type: str | None = None


def _choose_cost_model(
    model_dir: Path,
    weights_ok: bool,
    parameter_count: int,
    cross_checks: list[dict[str, Any]],
    notes: list[str],
) -> _CostChoice:
    """analytic if the architecture is written out, else a FlopCounterMode fit, else nothing."""
    choice = _CostChoice()
    try:
        config = load_model_config(model_dir)
    except ArtifactError:
        raise
    except Exception as exc:  # unknown model type, broken config: fall back and say why
        notes.append(f"transformers cannot read the model config ({type(exc).__name__}: {exc}).")
        return choice
    choice.model_type = getattr(config, "model_type", None)
    choice.architecture = ArchitectureSpec.from_hf_config(config)
    if choice.architecture is not None:
        choice.method, choice.confidence = "analytic", "medium"  # "high" once cross-checked
        choice.cost = choice.architecture.cost_model()
        return choice
    # Fake tensors first (cheap at any size); real weights if the model code needs real values
    # and the model is small enough for a CPU forward.
    for fit_mode in ("fake", "weights") if weights_ok else ("fake",):
        try:
            choice.cost, fit_checks = fit_cost_model(model_dir, parameter_count, mode=fit_mode)
        except Exception as exc:  # data-dependent code, MoE routing, ...: next mode or 2*N*T
            notes.append(f"FlopCounterMode fit ({fit_mode}) failed ({type(exc).__name__}: {exc}).")
            continue
        choice.method, choice.confidence = "flop_counter", "medium"
        cross_checks.extend(fit_checks)
        notes.append(
            f"Model type '{choice.model_type}' has no analytic formula: cost model fitted to "
            f"FlopCounterMode counts of its own forward code ({fit_mode} mode, eager attention)."
        )
        break
    return choice


def estimate_model_flops(
    model_dir: Path | str,
    *,
    model: str,
    dtype: str,
    parameter_count: int,
    cross_check: bool = True,
    cross_check_mode: Literal["auto", "weights", "fake"] = "auto",
    use_calflops: bool = True,
    max_weights_cross_check_params: int = DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS,
) -> dict[str, Any]:
    """The cost model of one model at one dtype, with its cross-checks: data of artifact `flops_model`.

    `model` is the campaign's name for it (models.<name>); `parameter_count` is the model manifest's
    (every parameter, a tied lm_head once). `dtype` sets the bytes per weight and KV element.
    Cross-checks run on the real weights (CPU, float32) for models up to
    `max_weights_cross_check_params` parameters and on fake tensors above that (`cross_check_mode`
    forces one); calflops runs only with real weights.
    """
    model_dir = Path(model_dir)
    bpp = bytes_per_param(dtype)
    if isinstance(parameter_count, bool) or not isinstance(parameter_count, int) or parameter_count < 1:
        raise ArtifactError(
            f"{model_dir}: parameter_count {parameter_count!r} is not a positive integer; "
            "it comes from the model manifest: run the download_model rule again"
        )
    notes: list[str] = []
    if cross_check_mode == "auto":
        mode: CrossCheckMode = "weights" if parameter_count <= max_weights_cross_check_params else "fake"
    else:
        mode = cross_check_mode
    cross_checks: list[dict[str, Any]] = []
    choice = _choose_cost_model(model_dir, mode == "weights", parameter_count, cross_checks, notes)
    arch = choice.architecture
    if choice.cost is not None:
        notes.extend(_COUNTING_NOTES)
    else:
        notes.append(
            f"Parameter estimate 2 x N x T with N = {parameter_count} (all parameters, embeddings included) "
            "and T = prompt tokens + decode steps; attention over the context is not counted."
        )
    if arch is not None and arch.parameter_count() != parameter_count:
        # The architecture as read here misses (or adds) parameters the manifest counted: the formula
        # may then miss matmuls too.
        notes.append(
            f"The architecture's own parameter count ({arch.parameter_count()}) differs from the "
            f"manifest's ({parameter_count})."
        )
    confidence = choice.confidence
    if choice.method == "analytic":
        if cross_check:
            cross_checks.extend(analytic_cross_checks(model_dir, arch, CROSS_CHECK_SHAPE, mode, use_calflops, notes))
            counter = [c["relative_error"] for c in cross_checks if c["tool"] == "flop_counter"]
            if counter and all(e is not None and abs(e) <= HIGH_CONFIDENCE_RELATIVE_ERROR for e in counter):
                confidence = "high"
        else:
            notes.append("No cross-check was run: confidence stays medium.")
    return {
        "model": model,
        "method": choice.method,
        "confidence": confidence,
        "dtype": str(dtype),
        "bytes_per_param": bpp,
        "parameter_count": parameter_count,
        "cost_model": dataclasses.asdict(choice.cost) if choice.cost is not None else None,
        "cross_checks": cross_checks,
        "architecture": arch.to_dict() if arch is not None else None,
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Per cycle (llm_energy.aggregate)


def cycle_flops(model_flops: dict[str, Any], requests: Any, batch_size: int) -> dict[str, Any]:
    """FLOPs and minimal decode bytes of the requests of one cycle, from the model's `flops_model` data.

    `requests` is the cycle's requests table: one row per request and pass over the request set
    (columns input_tokens, output_tokens; optional repeat and batch_index, >= 0 for static batches,
    which tell which requests were decoded together). `batch_size` is the most sequences the engine
    decoded together where it scheduled requests itself (batch_index -1); both only bound how often
    the weights must be read (decode_bytes_min), never the FLOPs.
    """
    if batch_size < 1:
        raise ConfigError("grid.batch_size", f"must be >= 1, got {batch_size}", "set a positive batch size")
    notes = ["Useful FLOPs: padding tokens are excluded (token counts come from the requests table)."]
    pairs = _validated_requests(requests, notes)
    bpp = float(model_flops["bytes_per_param"])
    n = len(pairs)
    prefill_tokens = sum(i for i, _ in pairs)
    output_tokens = sum(o for _, o in pairs)
    decode_tokens = sum(max(o - 1, 0) for _, o in pairs)
    decode_steps_min, steps_basis = _decode_steps_min(requests, batch_size)

    kv_bytes: float | None = None
    if model_flops["cost_model"] is not None:
        cost = CostModel(**model_flops["cost_model"])
        per_request = [request_costs(cost, i, o, bytes_per_param=bpp) for i, o in pairs]
        prefill_flops = sum(r["prefill_flops"] for r in per_request)
        decode_flops = sum(r["decode_flops"] for r in per_request)
        weight_params = cost.decode_weight_params
        if cost.kv_elements_per_token is not None:
            kv_bytes = float(sum(r["decode_kv_bytes_min"] for r in per_request))
    else:
        n_params = int(model_flops["parameter_count"])
        prefill_flops = parameter_estimate_flops(n_params, prefill_tokens)
        decode_flops = parameter_estimate_flops(n_params, decode_tokens)
        weight_params = n_params
    if kv_bytes is None:
        notes.append("KV-cache size per token unknown: decode_bytes_min counts weights only.")
    weight_bytes = float(weight_params) * bpp * decode_steps_min
    notes.append(
        f"decode_bytes_min: weights read once per decode step, {decode_steps_min} steps at least "
        f"({steps_basis}), plus each request's cached K and V read at every step of it; "
        "a lower bound on bytes moved, so MBU computed from it is a lower bound too."
    )
    confidence = model_flops["confidence"]
    sliding_window = (model_flops.get("architecture") or {}).get("sliding_window")
    longest = max((i + o for i, o in pairs), default=0)
    if sliding_window is not None and longest > sliding_window:
        confidence = "medium" if confidence == "high" else confidence
        notes.append(
            f"Requests reach {longest} tokens, beyond the sliding window of {sliding_window}: "
            "attention counted over the full context (an upper bound)."
        )
    total = prefill_flops + decode_flops
    return {
        "method": model_flops["method"],
        "confidence": confidence,
        "total_flops": total,
        "prefill_flops": prefill_flops,
        "decode_flops": decode_flops,
        "per_request_mean_flops": (total / n) if n else None,
        "tokens": {
            "requests": n,
            "input_tokens": prefill_tokens,
            "output_tokens": output_tokens,
            "prefill_tokens": prefill_tokens,
            "decode_tokens": decode_tokens,
        },
        "decode_bytes_min": weight_bytes + (kv_bytes or 0.0),
        "decode_bytes_breakdown": {
            "weight_bytes": weight_bytes,
            "kv_cache_bytes": kv_bytes,
            "decode_steps_min": decode_steps_min,
            "batch_size": int(batch_size),
            "decode_weight_params": int(weight_params),
        },
        "notes": notes,
    }
