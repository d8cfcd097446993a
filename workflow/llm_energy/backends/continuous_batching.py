"""transformers' continuous batching: how the pytorch backend serves requests arriving at a rate.

transformers >= 5 has a continuous-batching engine of its own (`model.init_continuous_batching()`, a
`ContinuousBatchingManager`): a background thread runs a scheduler over a paged KV cache and forwards
one batch per step, admitting requests as they come and dropping them as they finish. Requests are
handed to it one by one (`add_request`) while it runs, so each can be submitted at its arrival time;
with `streaming=True` it delivers every request's output after each step, and with
`register_result_handler` each delivery is handed to a callback on our asyncio loop
(`call_soon_threadsafe`). That callback is where the timestamps are taken: when the token reaches the
caller (latency_source="transformers_cb_stream_arrival_at_caller"), one chunk per delivery.

How the campaign's settings map onto it (`engine_config`):
- `max_requests_per_batch` = the campaign batch size: requests forwarded together, as vLLM's
  max_num_seqs; an arrival beyond it waits in the engine's queue (its wait is part of its TTFT).
- the paged cache holds batch size x max_model_len tokens (`num_blocks`), the capacity of the static
  path's cache: never sized from free memory (on CPU transformers would take 90 % of the host RAM), and
  with no safety margin, which would keep the last requests of a full batch out.
- `max_batch_tokens` (tokens forwarded per step: prefill chunks and decode tokens) = what a full
  batch of max_model_len needs, at most transformers' own default of 8192.
- no block sharing: a prefix cache surviving from warm-up or from the previous pass over the request
  set (a window under load cycles it) would skip prefill work and distort the measurement, as vLLM's
  prefix caching (off for the same reason).
- the configured attention implementation is kept (no automatic switch to flash attention); eager
  runs as transformers' `paged|eager`. Uncompiled: transformers decides CUDA graphs and async batching
  itself (on for flash attention on CUDA, off where an attention mask is needed, never on CPU); what it
  decided is in the compile facts.

Decoding, as the offline path does it:
- greedy or sampling (temperature, top-p, top-k: processors continuous batching supports); sampling
  draws from torch's global generator, seeded per call, so its tokens depend on the batches formed, as
  in the offline path.
- fixed output length: the offline path sets min_new_tokens = max_new_tokens, which masks EOS at every
  step. min_new_tokens is dropped by continuous batching (MinNewTokensLengthLogitsProcessor does not
  support it), so EOS is suppressed at every step instead (`suppress_tokens`, a processor that masks the
  same logits whatever the batch layout) and no token stops a request (`eos_token_id=-1`): exactly
  max_output_tokens, the same logits masked. Checked per request.
- output_length eos: stops at any of the backend's EOS ids, EOS counted, as the offline path.
- a processor of the model's generation config that continuous batching drops (a repetition penalty,
  say) would change the decoding: refused when the engine starts.

Refused before any job (`settings_refusal`): an explicit compile mode or cache implementation (the paged
cache and transformers' own compile path replace them) and a device_map (the paged cache lives on one
device). Tried on CPU with transformers 5.19.0 and 5.17.0: the built-in tiny Llama and GPT-2, sdpa and
eager, fixed length and EOS, greedy and sampling; quantized weights bnb_8bit and torchao int8.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import logging
import math
from typing import Any

from llm_energy import clock
from llm_energy.backends.base import DecodingSettings, Request, RequestRecord
from llm_energy.errors import BackendError
from llm_energy.load import Schedule, run_on_schedule

log = logging.getLogger(__name__)

ENGINE_PATH = "continuous-batching"
LATENCY_SOURCE = "transformers_cb_stream_arrival_at_caller"
SETTINGS_KEY = "backend_settings.pytorch"
# transformers' default tokens per step (PagedAttentionMemoryHandler._default_max_batch_tokens).
DEFAULT_MAX_BATCH_TOKENS = 8192
# How often a wait for a request's last token checks that the engine thread is still alive.
LIVENESS_CHECK_S = 1.0
# The manager methods and arguments serve() relies on.
_MANAGER_API = {
    "add_request": ("input_ids", "request_id", "max_new_tokens", "streaming", "eos_token_id"),
    "register_result_handler": ("request_id", "callback"),
    "cancel_request": ("request_id",),
    "start": (),
    "stop": (),
    "is_running": (),
}
_CONFIG_FIELDS = ("num_blocks", "max_batch_tokens", "max_requests_per_batch", "allow_block_sharing", "safety_margin")


@functools.cache
def unavailable_reason() -> str | None:
    """None when the installed transformers offers the continuous batching serve() uses, else what is
    missing. Feature detection, not a version number: the API is young and has moved between releases."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return "transformers and torch are not installed (pip install -e .)"
    import transformers

    version = transformers.__version__
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError as exc:
        return (
            f"transformers {version} has no continuous batching ({exc}); install one that has "
            "(5.17.0 and 5.19.0 were tried)"
        )
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    missing = [f"ContinuousBatchingConfig.{name}" for name in _CONFIG_FIELDS if name not in fields]
    if not fields & {"page_size", "block_size"}:
        missing.append("ContinuousBatchingConfig.page_size")
    for method, arguments in _MANAGER_API.items():
        function = getattr(ContinuousBatchingManager, method, None)
        if function is None:
            missing.append(f"ContinuousBatchingManager.{method}")
            continue
        parameters = inspect.signature(function).parameters
        missing += [f"ContinuousBatchingManager.{method}({a}=)" for a in arguments if a not in parameters]
    if missing:
        return (
            f"transformers {version}'s continuous batching lacks {', '.join(missing)}; install one that "
            "has them (5.17.0 and 5.19.0 were tried)"
        )
    return None


def settings_refusal(settings: Any) -> str | None:
    """Why these backend_settings.pytorch cannot run through continuous batching (None: they can).
    `settings`: a PytorchSettings."""
    if settings.compile not in ("auto", False):
        return (
            f"{SETTINGS_KEY}.compile is '{settings.compile}', but a request rate runs through transformers' "
            "continuous batching, which this backend runs uncompiled: set compile to auto or false"
        )
    if settings.cache_implementation != "auto":
        return (
            f"{SETTINGS_KEY}.cache_implementation is '{settings.cache_implementation}', but under a request "
            "rate transformers' continuous batching keeps the KV cache in its own paged cache: set it to auto"
        )
    if settings.device_map is not None:
        return (
            f"{SETTINGS_KEY}.device_map is '{settings.device_map}', but transformers' continuous batching keeps "
            "its paged cache on one device: set device_map to null"
        )
    return None


@dataclasses.dataclass(frozen=True)
class EngineSizes:
    """What the engine is sized for (see the module docstring)."""

    max_requests_per_batch: int
    num_blocks: int
    page_size: int
    max_batch_tokens: int

    @classmethod
    def of(cls, batch_size: int, max_model_len: int, page_size: int) -> EngineSizes:
        blocks_per_request = math.ceil(max_model_len / page_size)
        return cls(
            max_requests_per_batch=batch_size,
            num_blocks=batch_size * blocks_per_request,
            page_size=page_size,
            max_batch_tokens=min(batch_size * max_model_len, DEFAULT_MAX_BATCH_TOKENS),
        )


def engine_config(sizes: EngineSizes, seed: int) -> Any:
    """The ContinuousBatchingConfig for these sizes, in this transformers' field names."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    kwargs: dict[str, Any] = {
        "num_blocks": sizes.num_blocks,
        "max_batch_tokens": sizes.max_batch_tokens,
        "max_requests_per_batch": sizes.max_requests_per_batch,
        "allow_block_sharing": False,
        "safety_margin": 0.0,
        "seed": seed,
        # 5.19 calls it page_size (block_size deprecated); 5.17 block_size.
        "page_size" if "page_size" in fields else "block_size": sizes.page_size,
    }
    if "auto_switch_to_flash" in fields:  # 5.19: keep the configured attention implementation
        kwargs["auto_switch_to_flash"] = False
    return ContinuousBatchingConfig(**kwargs)


def default_page_size() -> int:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    defaults = ContinuousBatchingConfig()
    return int(getattr(defaults, "page_size", None) or defaults.block_size)


def decoding_key(decoding: DecodingSettings, eos_ids: set[int]) -> tuple:
    """What the engine's logits processors depend on: a change starts a new engine (the seed and the
    output length do not: the seed is set per call, the length per request)."""
    return (
        decoding.mode,
        decoding.temperature,
        decoding.top_p,
        decoding.top_k,
        decoding.fixed_length,
        tuple(sorted(eos_ids)),
    )


def generation_config(model: Any, decoding: DecodingSettings, eos_ids: set[int], pad_token_id: int) -> Any:
    """The model's own generation config with the campaign's decoding over it, as the offline path's
    generate() call merges its keyword arguments over it."""
    config = copy.deepcopy(model.generation_config)
    updates: dict[str, Any] = {
        "pad_token_id": pad_token_id,
        "eos_token_id": sorted(eos_ids),
        "max_new_tokens": decoding.max_output_tokens,
    }
    if decoding.mode == "sampling":
        updates.update(
            do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k or None
        )
    else:
        updates.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    # Fixed length: EOS masked at every step, the equivalent of min_new_tokens = max_new_tokens.
    updates["suppress_tokens"] = sorted(eos_ids) if decoding.fixed_length else None
    config.update(**updates)
    return config


def _check_processors(model: Any, config: Any) -> None:
    """Continuous batching drops the logits processors marked `supports_continuous_batching = False` (a
    repetition penalty, say): one of those in the generation config would change the decoding."""
    dropped = [
        type(p).__name__
        for p in model._get_logits_processor(config)
        if getattr(p, "supports_continuous_batching", None) is False
    ]
    if dropped:
        raise BackendError(
            f"transformers' continuous batching drops {', '.join(dropped)} of the model's generation config, so it "
            "would not decode as the offline path does; run this model at grid.request_rate: [inf]"
        )


class ContinuousBatchingEngine:
    """One running ContinuousBatchingManager for one decoding (see decoding_key), and the asyncio loop
    its outputs are delivered to. Started outside the measured windows (the harness's compile window)."""

    def __init__(
        self,
        model: Any,
        decoding: DecodingSettings,
        eos_ids: set[int],
        pad_token_id: int,
        sizes: EngineSizes,
        seed: int,
    ):
        self.key = decoding_key(decoding, eos_ids)
        self.eos_ids = set(eos_ids)
        self.sizes = sizes
        self._calls = itertools.count()
        attn_before = model.config._attn_implementation
        config = generation_config(model, decoding, eos_ids, pad_token_id)
        _check_processors(model, config)
        started = clock.now()
        self._manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=engine_config(sizes, seed)
        )
        self._manager.warmup()  # the paged cache, and CUDA graphs where transformers uses them
        self._manager.start()
        self._loop = asyncio.new_event_loop()
        resolved = self._manager.continuous_batching_config
        self.facts = {
            "engine_path": ENGINE_PATH,
            "transformers_version": _transformers_version(),
            "engine_start_s": clock.now() - started,
            "max_requests_per_batch": resolved.max_requests_per_batch,
            "num_blocks": resolved.num_blocks,
            "page_size": sizes.page_size,
            "kv_cache_tokens": sizes.num_blocks * sizes.page_size,
            "max_batch_tokens": resolved.max_batch_tokens,
            "allow_block_sharing": resolved.allow_block_sharing,
            "use_cuda_graph": list(resolved.use_cuda_graph) if resolved.use_cuda_graph is not None else None,
            "use_async_batching": resolved.use_async_batching,
            "attn_implementation": {"configured": attn_before, "running": model.config._attn_implementation},
            "logits_processors": [type(p).__name__ for p in self._manager.logit_processor.logits_processor],
        }
        log.info("continuous batching started: %s", self.facts)

    def kv_cache_bytes(self) -> int | None:
        """Bytes of the paged cache's allocation: one tensor in 5.19, one key and one value tensor per layer
        group in 5.17; None where neither is found (the engine not started)."""
        cache = getattr(self._manager.batch_processor, "cache", None)
        tensors = [getattr(cache, "cache_tensor", None)]
        tensors += [*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])] if tensors[0] is None else []
        found = [t for t in tensors if t is not None]
        return sum(int(t.numel() * t.element_size()) for t in found) if found else None

    def run(
        self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule | None
    ) -> list[RequestRecord]:
        """Submit each request at its due time (all at once without a schedule) and stream its tokens."""
        import torch

        call = next(self._calls)
        arrivals = schedule is not None
        schedule = schedule or Schedule.closed_batches(len(requests))
        torch.manual_seed(decoding.seed)  # sampling draws from the global generator, as the offline path
        eos = -1 if decoding.fixed_length else sorted(self.eos_ids)  # -1: no token stops a request

        async def one(request: Request, due_s: float) -> RequestRecord:
            request_id = f"llm-energy-{call}-{request.index}"
            finished: asyncio.Future = asyncio.get_running_loop().create_future()
            chunk_times: list[float] = []
            chunk_tokens: list[int] = []
            received = 0

            def on_output(output: Any) -> None:  # on this loop, once per engine step of the request
                nonlocal received
                arrived = clock.now()
                new = len(output.generated_tokens) - received
                if new > 0:
                    received += new
                    chunk_times.append(arrived)
                    chunk_tokens.append(new)
                if output.is_finished() and not finished.done():
                    finished.set_result(output)

            self._manager.register_result_handler(request_id, on_output)
            submitted = clock.now()
            accepted = self._manager.add_request(
                list(request.prompt_token_ids),
                request_id=request_id,
                max_new_tokens=decoding.max_output_tokens,
                streaming=True,
                eos_token_id=eos,
            )
            if accepted is None:
                raise BackendError(
                    f"transformers' continuous batching refused request {request.index} "
                    "(its engine thread is stopping or died; its log is above)"
                )
            try:
                output = await self._wait(finished)
            finally:
                if not finished.done():
                    self._manager.cancel_request(request_id)
            return self._record(
                request, output, submitted, chunk_times, chunk_tokens, decoding, due_s if arrivals else None
            )

        async def run_all() -> list[RequestRecord]:
            try:
                return await run_on_schedule(requests, schedule, one)
            finally:
                # After a failure the others are still in flight: cancel them (each cancels its request
                # in the engine), so that neither they nor their tokens outlive this call.
                others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        return self._loop.run_until_complete(run_all())

    async def _wait(self, finished: asyncio.Future) -> Any:
        """The request's last output; a BackendError if the engine thread dies first (no output would come)."""
        while True:
            done, _ = await asyncio.wait({finished}, timeout=LIVENESS_CHECK_S)
            if done:
                return finished.result()
            if not self._manager.is_running():
                error = self._manager.background_thread_status.fatal_error
                raise BackendError(f"transformers' continuous batching stopped with requests in flight: {error!r}")

    def _record(
        self,
        request: Request,
        output: Any,
        submitted: float,
        chunk_times: list[float],
        chunk_tokens: list[int],
        decoding: DecodingSettings,
        due_s: float | None,
    ) -> RequestRecord:
        if output.error is not None:
            raise BackendError(f"transformers' continuous batching failed request {request.index}: {output.error}")
        tokens = list(output.generated_tokens)
        if decoding.fixed_length and len(tokens) != decoding.max_output_tokens:
            raise BackendError(
                f"transformers' continuous batching returned {len(tokens)} tokens for request "
                f"{request.index}, not the fixed {decoding.max_output_tokens}"
            )
        if sum(chunk_tokens) != len(tokens):
            raise BackendError(f"request {request.index}: {sum(chunk_tokens)} tokens streamed, {len(tokens)} returned")
        return RequestRecord.streamed(request, submitted, chunk_times, chunk_tokens, tokens, LATENCY_SOURCE, due_s)

    def close(self) -> None:
        """Stop the engine thread (waiting for it), free the paged cache, restore the attention implementation."""
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.stop(block=True, timeout=30)
                manager.destroy()
            except Exception as exc:  # closing must not hide the error that led here
                log.warning("continuous batching stop: %s", exc)
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.close()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
