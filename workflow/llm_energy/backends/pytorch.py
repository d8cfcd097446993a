"""The pytorch backend: transformers `generate` (+ accelerate for multi-GPU placement).

Static batches with left padding; per-token arrival times come from a streamer that `generate` calls
once per decoding step (it moves each step's tokens to the host, which synchronizes the device, so the
host clock sees the token when it exists). TTFT is measured from the moment a batch is submitted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.backends import quantization
from llm_energy.backends.base import (
    Backend, DecodingSettings, LoadReport, Request, RequestRecord, tokenize_prompts,
)
from llm_energy.batching import make_batches
from llm_energy.errors import BackendError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class _StepClock:
    """A transformers streamer that records when each decoding step's tokens reach the host."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.step_times_s: list[float] = []

    def put(self, value) -> None:  # called with the prompt first, then once per generated step
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.step_times_s.append(clock.now())

    def end(self) -> None:
        pass


class PytorchBackend(Backend):
    name = "pytorch"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.model = None
        self.tokenizer = None
        self.device = "cpu"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed: pip install -e . (see README)"
        return None

    def _resolve_device(self) -> str:
        import torch

        wanted = self.settings.get("device", "auto")
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise BackendError(
                "backend_settings.pytorch.device is 'cuda' but torch sees no CUDA device; "
                "use 'auto' or 'cpu', or install a CUDA build of torch"
            )
        return wanted

    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.settings.get("num_threads"):
            torch.set_num_threads(int(self.settings["num_threads"]))
        self.device = self._resolve_device()
        trust = bool(self.settings.get("trust_remote_code", False))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                # Padding is masked out and never counted; any id works, EOS is the usual choice.
                self.tokenizer.pad_token = self.tokenizer.eos_token
            kwargs: dict[str, Any] = {
                "dtype": getattr(torch, TORCH_DTYPES[dtype]),
                "attn_implementation": self.settings.get("attn_implementation", "sdpa"),
                "trust_remote_code": trust,
            }
            # accelerate places the weights straight onto the device(s): no detour through host
            # memory (that detour made a 1 B bf16 load take ~20 s on an H100 machine).
            kwargs["device_map"] = self.settings.get("device_map") or self.device
            method = self.settings.get("quantization") or quantization.NONE
            reason = quantization.unsupported_reason(method, self.device)
            if reason:
                raise BackendError(f"{quantization.SETTING_KEY}: {reason}")
            kwargs["quantization_config"] = quantization.quantization_config(method, kwargs["dtype"])
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
            self.model.eval()
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"out of GPU memory while loading {model_dir}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load model from {model_dir}: {exc}") from exc
        self.synchronize()
        parameters = sum(p.numel() for p in self.model.parameters())
        return LoadReport(
            device=self.device,
            dtype=dtype,
            details={
                "parameters": parameters,
                "attn_implementation": kwargs["attn_implementation"],
                "device_map": str(getattr(self.model, "hf_device_map", None) or self.device),
                "torch_threads": torch.get_num_threads(),
                "cache_implementation": self.settings.get("cache_implementation"),
                **quantization.load_details(method, self.model),
            },
        )

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        assert self.tokenizer is not None, "load() first"
        return tokenize_prompts(self.tokenizer, prompts, max_input_tokens)

    def _generation_kwargs(self, decoding: DecodingSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_output_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(self.eos_token_ids()),
        }
        if decoding.fixed_length:
            # min_new_tokens masks EOS until the limit: exactly max_output_tokens per request.
            kwargs["min_new_tokens"] = decoding.max_output_tokens
        if decoding.mode == "sampling":
            kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p,
                          top_k=decoding.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.settings.get("cache_implementation"):
            kwargs["cache_implementation"] = self.settings["cache_implementation"]
        return kwargs

    def _pad_left(self, batch: list[Request]):
        import torch

        width = max(r.input_tokens for r in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            n = request.input_tokens
            ids[row, width - n :] = torch.tensor(request.prompt_token_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def eos_token_ids(self) -> set[int]:
        """Every id that ends a sequence: the tokenizer's EOS and the generation config's (Llama 3 has
        several). vLLM stops on the same set, so both backends count the same tokens."""
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for eos in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
            if isinstance(eos, (list, tuple)):
                ids.update(int(i) for i in eos)
            elif eos is not None:
                ids.add(int(eos))
        return ids

    def count_output_tokens(self, generated: list[int], fixed_length: bool) -> int:
        """Tokens generated, without padding and without anything after EOS (EOS itself counts)."""
        if fixed_length:
            return len(generated)
        eos_ids = self.eos_token_ids()
        for position, token in enumerate(generated):
            if token in eos_ids:
                return position + 1
        return len(generated)

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        import torch
        from tqdm import tqdm

        assert self.model is not None, "load() first"
        batches = make_batches(
            requests, batch_size, self.settings.get("batching", "fixed"),
            self.settings.get("token_budget"), decoding.max_output_tokens,
        )
        kwargs = self._generation_kwargs(decoding)
        records: list[RequestRecord] = []
        torch.manual_seed(decoding.seed)
        for batch_index, batch in enumerate(tqdm(batches, desc="generate", unit="batch", mininterval=5)):
            ids, mask = self._pad_left(batch)
            step_clock = _StepClock()
            submitted = clock.now()
            try:
                with torch.inference_mode():
                    output = self.model.generate(input_ids=ids, attention_mask=mask, streamer=step_clock, **kwargs)
            except torch.cuda.OutOfMemoryError as exc:
                raise BackendError(f"out of GPU memory at batch size {len(batch)}: {exc}") from exc
            self.synchronize()
            finished = clock.now()
            new_tokens = output[:, ids.shape[1] :].tolist()
            for request, generated in zip(batch, new_tokens):
                n = self.count_output_tokens(generated, decoding.fixed_length)
                times = step_clock.step_times_s[:n]
                records.append(RequestRecord(
                    index=request.index, input_tokens=request.input_tokens, output_tokens=n,
                    submitted_s=submitted, finished_s=finished,
                    first_token_s=times[0] if times else None, token_times_s=times,
                    output_token_ids=generated[:n], batch_index=batch_index,
                    latency_source="host_clock_per_step",
                ))
        return sorted(records, key=lambda r: r.index)

    def synchronize(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
