"""The FLOPs estimate of an experiment (the estimate_flops rule): choose the cost model, apply it to
the measured requests, cross-check it, write the method and its confidence."""

from __future__ import annotations

import json
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
    CrossCheckMode,
    DEFAULT_MAX_CROSS_CHECK_SEQ_LEN,
    DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS,
    _analytic_cross_checks,
    build_model,
    fit_cost_model,
    load_model_config,
)


logger = logging.getLogger(__name__)


# A relative difference at or below this between analytic and FlopCounterMode counts makes the
# analytic estimate "high" confidence.
HIGH_CONFIDENCE_RELATIVE_ERROR = 0.02


# ---------------------------------------------------------------------------------------------
# Parameter count (for the last-resort estimate)


def count_parameters(model_dir: Path | str) -> int | None:
    """Parameters of a model folder: from safetensors headers (no weights read), else the config."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        total = 0
        for path in files:
            with open(path, "rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_len))
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
        return total
    try:
        model, _ = build_model(model_dir, "fake", "eager")
    except Exception as exc:  # any failure means: unknown; the caller reports it
        logger.warning("cannot count the parameters of %s: %s", model_dir, exc)
        return None
    return sum(int(p.numel()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Experiment-level estimate (the estimate_flops rule)


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
    (batch_index -1, e.g. vLLM), at most `batch_size` sequences share a step.
    """
    frame = requests.dropna(subset=["input_tokens", "output_tokens"])
    steps = (frame["output_tokens"].astype("int64") - 1).clip(lower=0)
    if len(frame) == 0:
        return 0, "no requests"
    if "batch_index" in frame.columns and bool((frame["batch_index"] >= 0).all()):
        per_batch = steps.groupby(frame["batch_index"].to_numpy()).max()
        return int(per_batch.sum()), f"{len(per_batch)} static batches, each until its longest request"
    total = int(steps.sum())
    return max(int(steps.max()), math.ceil(total / batch_size)), f"at most {batch_size} sequences per step"


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
    model_dir: Path, weights_ok: bool, cross_checks: list[dict[str, Any]], notes: list[str]
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
            choice.cost, fit_checks = fit_cost_model(model_dir, mode=fit_mode)
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


def estimate_experiment_flops(
    model_dir: Path | str,
    requests: Any,
    *,
    dtype: str,
    cross_check: bool = True,
    batch_size: int = 1,
    cross_check_mode: Literal["auto", "weights", "fake"] = "auto",
    use_calflops: bool = True,
    max_weights_cross_check_params: int = DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS,
    max_cross_check_seq_len: int = DEFAULT_MAX_CROSS_CHECK_SEQ_LEN,
) -> dict[str, Any]:
    """FLOPs of every request of a run, summed, with cross-checks: data of artifact `flops_estimate`.

    `requests` is the run's requests table (columns input_tokens, output_tokens; one row per
    request; an optional batch_index column, >= 0 for static batches, tells which requests were
    decoded together). `dtype` sets the bytes per weight and KV element. `batch_size` is the most
    sequences the engine decoded together where it scheduled requests itself (batch_index -1);
    both only bound how often the weights must be read (decode_bytes_min), never the FLOPs. Cross-checks run on the real weights (CPU, float32) for
    models up to `max_weights_cross_check_params` parameters and on fake tensors above that
    (`cross_check_mode` forces one); calflops runs only with real weights.
    """
    model_dir = Path(model_dir)
    bpp = bytes_per_param(dtype)
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}", "set a positive batch size")
    notes = ["Useful FLOPs: padding tokens are excluded (token counts come from the requests table)."]
    pairs = _validated_requests(requests, notes)
    n_params = count_parameters(model_dir)
    if cross_check_mode == "auto":
        weights_ok = n_params is not None and n_params <= max_weights_cross_check_params
        mode: CrossCheckMode = "weights" if weights_ok else "fake"
    else:
        mode = cross_check_mode
    cross_checks: list[dict[str, Any]] = []
    choice = _choose_cost_model(model_dir, mode == "weights", cross_checks, notes)

    n = len(pairs)
    prefill_tokens = sum(i for i, _ in pairs)
    output_tokens = sum(o for _, o in pairs)
    decode_tokens = sum(max(o - 1, 0) for _, o in pairs)
    decode_steps_min, steps_basis = _decode_steps_min(requests, batch_size)

    kv_bytes: float | None = None
    if choice.cost is not None:
        notes.extend(_COUNTING_NOTES)
        per_request = [request_costs(choice.cost, i, o, bytes_per_param=bpp) for i, o in pairs]
        prefill_flops = sum(r["prefill_flops"] for r in per_request)
        decode_flops = sum(r["decode_flops"] for r in per_request)
        weight_params = choice.cost.decode_weight_params
        if choice.cost.kv_elements_per_token is not None:
            kv_bytes = float(sum(r["decode_kv_bytes_min"] for r in per_request))
    else:
        if n_params is None:
            raise ArtifactError(
                f"{model_dir}: cannot estimate FLOPs: the architecture is unknown and the parameter "
                "count cannot be read (no *.safetensors and no buildable config); re-download the model"
            )
        prefill_flops = parameter_estimate_flops(n_params, prefill_tokens)
        decode_flops = parameter_estimate_flops(n_params, decode_tokens)
        weight_params = n_params
        notes.append(
            f"Parameter estimate 2 x N x T with N = {n_params} (all parameters, embeddings included) "
            "and T = prompt tokens + decode steps; attention over the context is not counted."
        )
    if kv_bytes is None:
        notes.append("KV-cache size per token unknown: decode_bytes_min counts weights only.")
    weight_bytes = float(weight_params) * bpp * decode_steps_min
    notes.append(
        f"decode_bytes_min: weights read once per decode step, {decode_steps_min} steps at least "
        f"({steps_basis}), plus each request's cached K and V read at every step of it; "
        "a lower bound on bytes moved, so MBU computed from it is a lower bound too."
    )

    window_exceeded = False
    arch = choice.architecture
    if arch is not None and arch.sliding_window is not None:
        longest = max((i + o for i, o in pairs), default=0)
        if longest > arch.sliding_window:
            window_exceeded = True
            notes.append(
                f"Requests reach {longest} tokens, beyond the sliding window of {arch.sliding_window}: "
                "attention counted over the full context (an upper bound)."
            )

    confidence = choice.confidence
    if choice.method == "analytic":
        if cross_check and pairs:
            cross_checks.extend(_analytic_cross_checks(
                model_dir, arch, pairs, mode, use_calflops, max_cross_check_seq_len, notes))
            counter = [c["relative_error"] for c in cross_checks if c["tool"] == "flop_counter"]
            if counter and all(
                e is not None and abs(e) <= HIGH_CONFIDENCE_RELATIVE_ERROR for e in counter
            ) and not window_exceeded:
                confidence = "high"
        else:
            notes.append("No cross-check was run: confidence stays medium.")

    total = prefill_flops + decode_flops
    return {
        "method": choice.method,
        "confidence": confidence,
        "total_flops": total,
        "prefill_flops": prefill_flops,
        "decode_flops": decode_flops,
        "per_request_mean_flops": (total / n) if n else None,
        "tokens": {"requests": n, "input_tokens": prefill_tokens, "output_tokens": output_tokens,
                   "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens},
        "decode_bytes_min": weight_bytes + (kv_bytes or 0.0),
        "decode_bytes_breakdown": {
            "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
            "decode_steps_min": decode_steps_min, "batch_size": int(batch_size),
            "decode_weight_params": int(weight_params),
        },
        "dtype": str(dtype),
        "bytes_per_param": bpp,
        "parameter_count": n_params,
        "cross_checks": cross_checks,
        "architecture": arch.to_dict() if arch is not None else None,
        "notes": notes,
    }
