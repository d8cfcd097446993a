"""Weight quantization of the pytorch backend: which methods exist, what each needs, and the bytes
the weights take once quantized.

`backend_settings.pytorch.quantization` names one method. Each method is applied through transformers'
own integration (a `quantization_config` passed to `from_pretrained`), so the weights are quantized as
they load. Tried on CPU (torch 2.13.0 CPU build, transformers 5.19.0):
- torchao 0.18.0 `torchao_int8_weight_only`: runs (Int8Tensor weights, 1 byte per weight).
- torchao 0.18.0 `fp8` (Float8WeightOnlyConfig): runs on CPU too; on CUDA it needs compute capability 8.9+.
- bitsandbytes 0.50.2 `bnb_8bit`: runs (Int8Params weights).
- torchao 0.18.0 `torchao_int4_weight_only`: no CPU layout (plain needs mslk, tile-packed needs CUDA).
- bitsandbytes 0.50.2 `bnb_4bit`: loads on CPU but its CPU matmul fails on generate
  ("N must be divisible by block_n"): CUDA only here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

SETTING_KEY = "backend_settings.pytorch.quantization"
NONE = "none"
TORCHAO_PIN = "torchao==0.18.0"
BITSANDBYTES_PIN = "bitsandbytes==0.50.2"
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Method:
    package: str  # the import name the method needs
    pin: str  # what to install
    runs_on_cpu: bool
    why_not_cpu: str = ""


METHODS: dict[str, Method] = {
    "bnb_4bit": Method(
        "bitsandbytes",
        BITSANDBYTES_PIN,
        False,
        "bitsandbytes 4-bit fails to generate on CPU (its CPU kernel); it needs a CUDA GPU here",
    ),
    "bnb_8bit": Method("bitsandbytes", BITSANDBYTES_PIN, True),
    "torchao_int8_weight_only": Method("torchao", TORCHAO_PIN, True),
    "torchao_int4_weight_only": Method(
        "torchao", TORCHAO_PIN, False, "torchao int4 weight-only has no CPU layout; it needs a CUDA GPU"
    ),
    "fp8": Method("torchao", TORCHAO_PIN, True),
}


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def unsupported_reason(method: str, device: str | None = None) -> str | None:
    """None when `method` can run here (installed, and the device supports it), else what to do.
    `device` is the pytorch device setting (auto, cpu, cuda); auto means CUDA where torch sees one."""
    if method in (None, NONE):
        return None
    if method not in METHODS:
        return f"unknown method '{method}'; use one of: {NONE}, {', '.join(METHODS)}"
    spec = METHODS[method]
    if importlib.util.find_spec(spec.package) is None:
        return f"'{method}' needs {spec.package}, which is not installed: pip install {spec.pin}"
    capability = None if device == "cpu" else _cuda_capability()
    if capability is None:
        if device == "cuda":
            return f"'{method}' is set for device cuda but torch sees no CUDA GPU"
        return None if spec.runs_on_cpu else f"{spec.why_not_cpu} (this run is on CPU)"
    if method == "fp8" and capability < FP8_MIN_COMPUTE_CAPABILITY:
        return (
            f"'fp8' needs a GPU of compute capability 8.9 or more (Ada, Hopper); this one is "
            f"{capability[0]}.{capability[1]}: use torchao_int8_weight_only or bnb_8bit"
        )
    return None


def quantization_config(method: str, dtype: Any) -> Any | None:
    """The transformers `quantization_config` for `method` (None for none). `dtype` is the torch
    dtype the model loads in: bitsandbytes 4-bit computes in it."""
    if method in (None, NONE):
        return None
    if method.startswith("bnb_"):
        from transformers import BitsAndBytesConfig

        if method == "bnb_8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = {
        "torchao_int8_weight_only": Int8WeightOnlyConfig,
        "torchao_int4_weight_only": Int4WeightOnlyConfig,
        "fp8": Float8WeightOnlyConfig,
    }[method]()
    return TorchAoConfig(config)


def stored_bytes(tensor: Any) -> int:
    """Bytes a tensor takes as stored: a torchao tensor subclass counts its inner tensors (int8 data
    + scales), a plain tensor numel x element size (an int8 or packed uint8 weight, 1 byte each)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ not in ("Parameter", "Tensor"):
        names, _ = flatten()
        # Only the inner tensors: a DTensor (a tensor-parallel shard) also names its device mesh; its
        # local shard is what this process stores.
        inner = [getattr(tensor, name) for name in names]
        return sum(stored_bytes(t) for t in inner if hasattr(t, "numel"))
    total = tensor.numel() * tensor.element_size()
    for extra in ("SCB", "quant_state"):  # bitsandbytes keeps scales beside the weight
        state = getattr(tensor, extra, None)
        if hasattr(state, "numel"):
            total += state.numel() * state.element_size()
        elif state is not None and hasattr(state, "absmax"):
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def weight_bytes(model: Any) -> dict[str, int]:
    """`weight_bytes`: every parameter and buffer as stored (each tensor once); `matmul_weight_bytes`:
    the weights of the Linear layers (lm_head included), the weights a decode step reads in full."""
    import torch

    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += stored_bytes(tensor)
    matmul = sum(
        stored_bytes(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear8bitLt", "Linear4bit")
    )
    return {"weight_bytes": int(total), "matmul_weight_bytes": int(matmul)}


def quantized_weight_type(model: Any) -> str:
    """The type and dtype of the first Linear weight, e.g. 'Int8Tensor(float32)' (proof of the method)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            return f"{type(weight).__name__}({str(weight.dtype).removeprefix('torch.')})"
    return "no Linear layer"


def load_details(method: str, model: Any) -> dict[str, Any]:
    """What the load report records about the weights: method, weight type and stored bytes."""
    return {
        "quantization": method or NONE,
        "quantized_weight_type": quantized_weight_type(model),
        **weight_bytes(model),
    }
