"""Measured counts on the real model code: FlopCounterMode forwards and decode steps, calflops in a
subprocess, and a cost model fitted from FlopCounterMode for architectures without a formula."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NamedTuple

from llm_energy.errors import ArtifactError
from llm_energy.flops.analytic import (
    ArchitectureSpec,
    CostModel,
    analytic_decode_step_flops,
    analytic_forward_flops,
)

logger = logging.getLogger(__name__)


# Models up to this many parameters are cross-checked with their real weights on the CPU (float32);
# larger ones with the same code on fake tensors (shapes only, no memory, no weights read).
DEFAULT_MAX_WEIGHTS_CROSS_CHECK_PARAMS = 200_000_000
# The batch and prompt length of the cross-check forwards. The counts are exact at any shape (the
# formulas are polynomials in batch and length); a batch of 2 exercises batching, and 32 tokens keep
# a CPU forward cheap and fit every model's context.
CROSS_CHECK_SHAPE = (2, 32)

CrossCheckMode = Literal["weights", "fake"]


# ---------------------------------------------------------------------------------------------
# Measured counts: FlopCounterMode on the real model code


def load_model_config(model_dir: Path | str) -> Any:
    """The transformers config of a local model folder (never the hub)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{model_dir}: no config.json; is this a downloaded model folder?")
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def build_model(model_dir: Path, mode: CrossCheckMode, attn_implementation: str):
    """The causal LM of `model_dir` in eval mode: real float32 weights, or fake tensors from the config.

    Fake mode runs the same transformers code on tensors that carry shapes only, so an 8B model
    costs about a second and no memory. The caller must run the forward inside the returned mode.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if mode == "weights":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            local_files_only=True,
        )
        return model.eval(), None
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        config = load_model_config(model_dir)
        with fake_mode:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        # eval(): from_config returns a model in training mode, where e.g. OPT draws LayerDrop.
        return model.eval(), fake_mode
    raise ValueError(f"mode must be 'weights' or 'fake', got {mode!r}")


class _ForwardCount(NamedTuple):
    total_flops: int
    by_module: dict[str, int]


def _count_forward(
    model, fake_mode, batch: int, seq_len: int, *, use_cache: bool, past_key_values: Any = None
) -> tuple[_ForwardCount, Any]:
    """FlopCounterMode count of one forward of `seq_len` random new tokens per sequence."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vocab = int(model.config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    # An explicit all-ones mask: without one, transformers inspects the ids for padding, a
    # data-dependent check that fake tensors cannot answer.
    mask = torch.ones((batch, past_len + seq_len), dtype=torch.long)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = model(input_ids=ids, attention_mask=mask, use_cache=use_cache, past_key_values=past_key_values)
    by_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return _ForwardCount(int(counter.get_total_flops()), by_module), output


def measured_forward_flops(
    model_dir: Path | str,
    batch: int,
    seq_len: int,
    attn_implementation: str = "eager",
    *,
    mode: CrossCheckMode = "weights",
) -> int:
    """FlopCounterMode count of one forward of the model (no KV cache, logits for all positions).

    mode "weights" loads the real weights on the CPU in float32 and feeds random ids; "fake" runs the
    same code on fake tensors (for models too large for a CPU forward). Use eager attention: with
    SDPA, FlopCounterMode does not see the attention matmuls on CPU.
    """
    model, fake_mode = build_model(Path(model_dir), mode, attn_implementation)
    count, _ = _count_forward(model, fake_mode, batch, seq_len, use_cache=False)
    return count.total_flops


def measured_decode_step_flops(
    model_dir: Path | str,
    batch: int,
    kv_len: int,
    attn_implementation: str = "eager",
    *,
    mode: CrossCheckMode = "weights",
) -> int:
    """FlopCounterMode count of one decode step over a real KV cache of kv_len - 1 prior positions."""
    if kv_len < 2:
        raise ValueError("kv_len must be >= 2 (at least one cached position plus the new token)")
    model, fake_mode = build_model(Path(model_dir), mode, attn_implementation)
    return _decode_step_count(model, fake_mode, batch, kv_len)


def _decode_step_count(model, fake_mode, batch: int, kv_len: int) -> int:
    _, prefill_output = _count_forward(model, fake_mode, batch, kv_len - 1, use_cache=True)
    step, _ = _count_forward(model, fake_mode, batch, 1, use_cache=True, past_key_values=prefill_output.past_key_values)
    return step.total_flops


class CalflopsResult(NamedTuple):
    flops: int | None
    reason: str | None  # why flops is None


_CALFLOPS_MARKER = "LLM_ENERGY_CALFLOPS_RESULT="
# Runs in a fresh interpreter: after one failed calculate_flops call calflops leaves its patches in
# place and every later call in that process counts twice.
_CALFLOPS_SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
try:
    import torch
    from calflops import calculate_flops
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        args["model_dir"], dtype=torch.float32, attn_implementation=args["attn_implementation"],
        local_files_only=True).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (args["batch"], args["seq_len"]), generator=generator)
    # The kwargs path: calflops' input_shape + tokenizer path fails on transformers 5 (encode_plus).
    # Tensors only: calflops calls .to(device) on every kwarg, so use_cache=False cannot be passed
    # (filling the KV cache adds no matmul FLOPs anyway).
    flops, _macs, _params = calculate_flops(
        model=model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        output_as_string=False, print_results=False)
    result = {"flops": int(flops)}
except Exception as exc:
    result = {"error": f"{type(exc).__name__}: {exc}"}
print(MARKER + json.dumps(result), flush=True)
""".replace("MARKER", repr(_CALFLOPS_MARKER))


def calflops_forward_flops(
    model_dir: Path | str,
    batch: int,
    seq_len: int,
    attn_implementation: str = "eager",
    *,
    timeout_s: float = 600.0,
) -> CalflopsResult:
    """calflops' count of one forward (real weights, CPU, float32), run in a fresh subprocess."""
    args = {
        "model_dir": str(model_dir),
        "batch": int(batch),
        "seq_len": int(seq_len),
        "attn_implementation": attn_implementation,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _CALFLOPS_SCRIPT, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return CalflopsResult(None, f"calflops did not finish within {timeout_s:.0f} s")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(_CALFLOPS_MARKER):
            result = json.loads(line[len(_CALFLOPS_MARKER) :])
            if "flops" in result:
                return CalflopsResult(result["flops"], None)
            return CalflopsResult(None, f"calflops failed: {result['error']}")
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return CalflopsResult(None, f"calflops subprocess exited {completed.returncode}: {' | '.join(tail)}")


# ---------------------------------------------------------------------------------------------
# Fitted cost model for architectures without a formula


def _module_key(model, module) -> str | None:
    """FlopCounterMode's name for `module`: '<ModelClass>.<dotted path>'."""
    for name, candidate in model.named_modules():
        if candidate is module and name:
            return f"{type(model).__name__}.{name}"
    return None


def _kv_elements_per_token(cache: Any, batch: int, seq_len: int) -> int | None:
    """K and V elements a transformers cache holds per token, summed over layers (None if unreadable)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.shape[-2] != seq_len:
            return None  # a sliding or compressed cache: per-token size is not constant
        total += keys.numel() + values.numel()
    return total // (batch * seq_len)


def fit_cost_model(
    model_dir: Path | str,
    parameter_count: int,
    *,
    mode: CrossCheckMode = "fake",
    attn_implementation: str = "eager",
    seq_lens: tuple[int, int, int] = (8, 16, 24),
) -> tuple[CostModel, list[dict[str, Any]]]:
    """Fit a CostModel to FlopCounterMode counts of real forwards of the model's own code.

    A full forward of s tokens costs a*s + b*s^2 without the lm_head (linear layers, then attention
    over the s x s square) plus c*s for the lm_head, whose share FlopCounterMode reports per module.
    Two lengths give a and b exactly; a third length and a real decode step must then match exactly,
    or the model is not of this form (sliding windows, mixture of experts) and ValueError is raised.
    `parameter_count` is the model manifest's: a decode step reads all of it but the gathered rows of
    an untied input embedding. Returns the model and the validation points (cross_check records).
    """
    model_dir = Path(model_dir)
    model, fake_mode = build_model(model_dir, mode, attn_implementation)
    output_embeddings = model.get_output_embeddings()
    lm_head_key = _module_key(model, output_embeddings) if output_embeddings is not None else None
    if lm_head_key is None:
        raise ValueError("the model has no output embedding (lm_head) module")

    bodies: list[int] = []
    logits_per_position: set[Fraction] = set()
    cache_elements: int | None = None
    for seq_len in seq_lens:
        count, output = _count_forward(model, fake_mode, 1, seq_len, use_cache=True)
        lm_head = count.by_module.get(lm_head_key, 0)
        bodies.append(count.total_flops - lm_head)
        logits_per_position.add(Fraction(lm_head, seq_len))
        if cache_elements is None:
            cache_elements = _kv_elements_per_token(getattr(output, "past_key_values", None), 1, seq_len)
    if len(logits_per_position) != 1:
        raise ValueError(f"lm_head FLOPs are not proportional to length: {sorted(logits_per_position)}")
    s1, s2, s3 = seq_lens
    b = (Fraction(bodies[1], s2) - Fraction(bodies[0], s1)) / (s2 - s1)
    a = Fraction(bodies[0], s1) - b * s1
    c = logits_per_position.pop()
    if any(x.denominator != 1 or x < 0 for x in (a, b, c)):
        raise ValueError(f"counts do not fit linear + quadratic attention terms (a={a}, b={b}, c={c})")
    predicted_third = int(a * s3 + b * s3 * s3)
    checks = [
        _cross_check_record(
            "flop_counter_fit", "prefill", 1, s3, predicted_third + int(c) * s3, bodies[2] + int(c) * s3, mode
        )
    ]
    if predicted_third != bodies[2]:
        raise ValueError(
            f"forward FLOPs at {s3} tokens ({bodies[2]}) differ from the fit ({predicted_third}): "
            "the attention cost is not quadratic in length"
        )

    input_embeddings = model.get_input_embeddings()
    gathered = 0
    if (
        input_embeddings is not None
        and output_embeddings is not None
        and (input_embeddings.weight is not output_embeddings.weight)
    ):
        gathered = int(input_embeddings.weight.numel())
    cost = CostModel(
        linear_flops_per_token=int(a),
        logits_flops_per_position=int(c),
        attention_flops_per_query_key=int(b),
        decode_weight_params=int(parameter_count) - gathered,
        kv_elements_per_token=cache_elements,
    )
    kv_len = s2 + 1
    measured_step = _decode_step_count(model, fake_mode, 1, kv_len)
    predicted_step = cost.decode_step_flops(1, kv_len)
    checks.append(_cross_check_record("flop_counter_fit", "decode", 1, kv_len, predicted_step, measured_step, mode))
    if measured_step != predicted_step:
        raise ValueError(f"a decode step costs {measured_step} FLOPs, the fit predicts {predicted_step}")
    return cost, checks


def _cross_check_record(
    tool: str,
    phase: str,
    batch: int,
    seq_len: int,
    analytic: int,
    measured: int | None,
    mode: str,
) -> dict[str, Any]:
    relative_error = None
    if measured:
        relative_error = (analytic - measured) / measured
    return {
        "tool": tool,
        "phase": phase,
        "mode": mode,
        "batch": int(batch),
        "seq_len": int(seq_len),
        "analytic_flops": int(analytic),
        "measured_flops": measured,
        "relative_error": relative_error,
    }


def analytic_cross_checks(
    model_dir: Path,
    arch: ArchitectureSpec,
    shape: tuple[int, int],
    mode: CrossCheckMode,
    use_calflops: bool,
    notes: list[str],
) -> list[dict[str, Any]]:
    """Analytic counts of one prefill forward of `shape` (batch, prompt tokens) and one decode step
    after it against the model's real code."""
    batch, seq_len = shape
    checks: list[dict[str, Any]] = []
    # Match what a plain forward computes: no KV cache, logits for all positions, eager attention.
    forward = analytic_forward_flops(arch, batch, seq_len, logits="all")
    kv_len = seq_len + 1
    step = analytic_decode_step_flops(arch, batch, kv_len)
    measured: int | None = None
    measured_step: int | None = None
    try:
        model, fake_mode = build_model(model_dir, mode, "eager")
        measured = _count_forward(model, fake_mode, batch, seq_len, use_cache=False)[0].total_flops
        measured_step = _decode_step_count(model, fake_mode, batch, kv_len)
    except Exception as exc:  # a cross-check that cannot run lowers confidence, not the rule
        logger.warning("FlopCounterMode cross-check failed: %s", exc)
        notes.append(f"FlopCounterMode cross-check failed ({type(exc).__name__}: {exc}).")
    checks.append(_cross_check_record("flop_counter", "prefill", batch, seq_len, forward, measured, mode))
    checks.append(_cross_check_record("flop_counter", "decode", batch, kv_len, step, measured_step, mode))
    if use_calflops:
        if mode != "weights":
            notes.append("calflops cross-check skipped: the model is too large for a CPU forward.")
        else:
            result = calflops_forward_flops(model_dir, batch, seq_len, "eager")
            if result.flops is None:
                notes.append(f"calflops cross-check unavailable: {result.reason}")
            checks.append(_cross_check_record("calflops", "prefill", batch, seq_len, forward, result.flops, mode))
    return checks
