"""The pytorch backend: transformers `generate` (+ accelerate for multi-GPU placement).

Static batches with left padding; per-token arrival times come from a streamer that `generate` calls
once per decoding step with that step's tokens on the host, so the host clock sees a token when it
reaches the caller: with the per-step stop check as soon as it exists (the copy synchronizes the
device), with the fast path's deferred one a step later, when its asynchronous copy has landed
(llm_energy.backends.stop_check). TTFT is measured from the moment a batch is submitted.

Two engine paths (`engine_path`):
- "fast": one `transformers.StaticCache` of fixed length (max_model_len) and batch size, owned by the
  backend and reset before every batch, passed to `generate`, which then compiles its decoding step
  itself (`_valid_auto_compile_criteria` + `CompileConfig`; the prefill stays eager). Every batch is
  padded to the batch size, so the decoding step has one shape per experiment: `compile()` compiles
  and captures it once, outside the measured window. A persistent cache keeps the tensor addresses
  that CUDA graphs were captured with (a fresh cache per call would allocate inside the window). On
  CUDA its stop check is deferred, so the host queues the next step while the device runs this one.
- "eager": transformers' default dynamic cache, no compilation (the default on CPU, where compiling
  would cost more than it saves on a 2-core machine).
- "continuous-batching": under a request rate (or a concurrency cap), every window, warm-up and rewarm
  of the experiment runs through transformers' continuous batching, where requests join and leave the
  running batch one by one (llm_energy.backends.continuous_batching); the harness says so with its
  `serving` setting. Whether the installed transformers offers it decides `supports_schedule`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.backends import continuous_batching, quantization, stop_check
from llm_energy.backends.base import (
    HARNESS_SETTINGS,
    LAUNCH_DATA_PARALLEL,
    LAUNCH_IN_PROCESS,
    LAUNCH_TENSOR_PARALLEL,
    Backend,
    DecodingSettings,
    Execution,
    LoadReport,
    Request,
    RequestRecord,
    tokenize_prompts,
)
from llm_energy.backends.batching import batches_for_settings
from llm_energy.errors import BackendError, ConfigError
from llm_energy.load import Schedule
from llm_energy.specs import schema_spec, section_spec

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SETTINGS_KEY = "backend_settings.pytorch"


@schema_spec("#/properties/backend_settings/properties/pytorch", not_fields=("variants",))
@dataclass(frozen=True)
class PytorchSettings:
    """backend_settings.pytorch, typed; types, defaults and meanings are the config schema's."""

    device: str
    device_map: str | None
    quantization: str
    attn_implementation: str
    cache_implementation: str
    compile: str | bool
    compile_backend: str
    stop_check: str
    num_threads: int | None
    data_parallel: int
    tensor_parallel: int
    data_parallel_timeout_s: float

    @classmethod
    def of(cls, settings: PytorchSettings | Mapping[str, Any] | None) -> PytorchSettings:
        """The typed settings of a backend's settings mapping (the harness's own keys left out)."""
        if isinstance(settings, cls):
            return settings
        return section_spec(cls, {k: v for k, v in (settings or {}).items() if k not in HARNESS_SETTINGS})


@dataclass(frozen=True)
class EnginePath:
    """How the backend generates, resolved from the settings and the device."""

    cache_implementation: str  # "dynamic" or "static"
    compile_mode: str | None  # a torch.compile mode; None: not compiled
    compile_backend: str  # torch.compile backend ("inductor"; "eager"/"aot_eager" skip code generation)
    stop_check: str = "per_step"  # llm_energy.backends.stop_check: "per_step" (transformers' default) or "deferred"

    @property
    def compiled(self) -> bool:
        return self.compile_mode is not None

    @property
    def label(self) -> str:
        if self.cache_implementation == "static":
            return "fast" if self.compiled else "static"
        return "eager"


def resolve_engine_path(settings: PytorchSettings | Mapping[str, Any], device: str) -> EnginePath:
    """ "auto" means the fast path on CUDA (with the deferred stop check) and eager dynamic elsewhere; an
    explicit compile mode implies the static cache (transformers compiles only over a static cache)."""
    config = PytorchSettings.of(settings)
    if config.compile == "auto":
        compile_mode = "reduce-overhead" if device == "cuda" else None
    else:
        compile_mode = config.compile or None
    cache = config.cache_implementation
    if cache == "auto":
        cache = "static" if device == "cuda" or compile_mode else "dynamic"
    return EnginePath(cache, compile_mode, config.compile_backend, stop_check.resolve(config.stop_check, device, cache))


def check_settings(settings: PytorchSettings | Mapping[str, Any]) -> None:
    """The checks of backend_settings.pytorch that need more than the schema: raised before any job."""
    config = PytorchSettings.of(settings)
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{SETTINGS_KEY}.attn_implementation",
            "is 'flash_attention_2' but the flash_attn package is not installed",
            "Install it on the GPU machine (pip install flash-attn --no-build-isolation, with a CUDA build of "
            "torch), or use 'sdpa'.",
        )
    if config.compile not in ("auto", False) and config.cache_implementation == "dynamic":
        raise ConfigError(
            f"{SETTINGS_KEY}.compile",
            f"is '{config.compile}' but cache_implementation is 'dynamic'",
            "transformers compiles generate only over a static cache: set cache_implementation to 'static' "
            "or 'auto', or compile to false.",
        )
    if config.stop_check == "deferred" and config.cache_implementation == "dynamic":
        raise ConfigError(
            f"{SETTINGS_KEY}.stop_check",
            "is 'deferred' but cache_implementation is 'dynamic'",
            "the deferred stop check runs one extra step that only a static cache can absorb: set "
            "cache_implementation to 'static' or 'auto', or stop_check to 'per_step' or 'auto'.",
        )
    reason = quantization.unsupported_reason(config.quantization, config.device)
    if reason:
        raise ConfigError(quantization.SETTING_KEY, reason, "Install what is named, or choose another method.")
    if config.tensor_parallel > 1 and (
        config.data_parallel > 1 or config.device_map is not None or config.quantization != "none"
    ):
        raise ConfigError(
            f"{SETTINGS_KEY}.tensor_parallel",
            f"is {config.tensor_parallel} with data_parallel "
            f"{config.data_parallel}, device_map {config.device_map!r}, quantization {config.quantization!r}: "
            "tp_plan splits one unquantized model over the processes on its own",
            "Use tensor_parallel alone (data_parallel 1, device_map null, quantization none).",
        )
    if config.data_parallel > 1 and config.device_map is not None:
        raise ConfigError(
            f"{SETTINGS_KEY}.data_parallel",
            f"is {config.data_parallel} with device_map "
            f"{config.device_map!r}: each data-parallel replica runs on one GPU of its own",
            "Leave device_map null, or data_parallel at 1.",
        )


def compilation_counter() -> int:
    """torch dynamo's count of frame conversions: it grows with every compilation and recompilation
    (also one that fails and falls back to eager), never otherwise. Process-wide and monotone."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache's key and value tensors (allocated layers only)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and getattr(layer, "is_initialized", True):
                total += quantization.stored_bytes(tensor)
    return total


def _width(batch: list[Request]) -> int:
    """The padded prompt width of a batch (left padding to its longest prompt)."""
    return max(r.input_tokens for r in batch)


def _peak_rss_bytes() -> int:
    """The process's peak resident memory: VmHWM (resettable), else getrusage (since process start)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


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


class _ContinuousBatchingInstalled:
    """PytorchBackend.supports_schedule: whether the installed transformers has the continuous batching
    serve() runs on, looked up when first asked (it imports transformers and torch)."""

    def __get__(self, instance: Any, owner: type) -> bool:
        return continuous_batching.unavailable_reason() is None


class PytorchBackend(Backend):
    name = "pytorch"

    supports_schedule = _ContinuousBatchingInstalled()  # type: ignore[assignment]

    @classmethod
    def schedule_unsupported_reason(cls, settings: dict[str, Any]) -> str | None:
        missing = continuous_batching.unavailable_reason()
        if missing:
            return f"it takes arrival times through transformers' continuous batching, and {missing}"
        return continuous_batching.settings_refusal(PytorchSettings.of(settings))

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        self.config = PytorchSettings.of(self.settings)
        self.model = None
        self.tokenizer = None
        self.device = "cpu"
        self.path = EnginePath("dynamic", None, "inductor")  # resolved in load()
        self.max_cache_len: int | None = None
        self.batch_size: int | None = None
        self._static_cache = None  # the fast path's one StaticCache, for self._static_cache_batch rows
        self._static_cache_batch: int | None = None
        self._compile_config = None
        self._dynamic_kv_peak_bytes: int | None = None  # largest dynamic cache seen since the reset
        self._rss_reset = False
        # Under a request rate (the harness's `serving`): the continuous-batching engine of the current
        # decoding, started by compile() or the first generate().
        self.serving = bool(self.settings.get("serving", False))
        self._cb_engine: continuous_batching.ContinuousBatchingEngine | None = None

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        check_settings(settings)

    supports_data_parallel = True
    supports_tensor_parallel = True
    # Added after ids were fixed: at these values the id stays as it was before the setting existed
    # (a changed default behaviour is a change of code, which every artifact's git_commit records).
    id_neutral_settings = {"data_parallel": 1, "tensor_parallel": 1, "stop_check": "auto"}
    id_excluded_settings = ("data_parallel_timeout_s",)  # never changes what is measured

    @classmethod
    def execution(cls, settings: dict[str, Any]) -> Execution:
        config = PytorchSettings.of(settings)
        launch = (
            LAUNCH_TENSOR_PARALLEL
            if config.tensor_parallel > 1
            else LAUNCH_DATA_PARALLEL
            if config.data_parallel > 1
            else LAUNCH_IN_PROCESS
        )
        return Execution(
            launch=launch,
            harness_may_init_cuda=True,
            data_parallel=config.data_parallel,
            tensor_parallel=config.tensor_parallel,
            barrier_timeout_s=config.data_parallel_timeout_s,
            keys={"data_parallel": "data_parallel", "tensor_parallel": "tensor_parallel"},
        )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed: pip install -e . (see README)"
        return None

    def _resolve_device(self) -> str:
        import torch

        wanted = self.config.device
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

        check_settings(self.config)
        if self.serving:
            refusal = self.schedule_unsupported_reason(self.settings)
            if refusal:  # the campaign check refuses it before any job; this guards other callers
                raise BackendError(f"the pytorch backend cannot serve requests at a rate: {refusal}")
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
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
                "attn_implementation": self.config.attn_implementation,
                "trust_remote_code": trust,
            }
            # accelerate places the weights straight onto the device(s): no detour through host
            # memory (that detour made a 1 B bf16 load take ~20 s on an H100 machine).
            if self.config.tensor_parallel > 1:  # a rank of a tensor-parallel group (llm_energy.data_parallel)
                kwargs["tp_plan"] = "auto"
            else:
                kwargs["device_map"] = self.config.device_map or self.device
            method = self.config.quantization  # checked by check_settings
            kwargs["quantization_config"] = quantization.quantization_config(method, kwargs["dtype"])
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
            self.model.eval()
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"out of GPU memory while loading {model_dir}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load model from {model_dir}: {exc}") from exc
        self.synchronize()
        # No parameter count here: the model manifest's is the one (a loaded quantized model packs
        # several weights per element, so counting its tensors would disagree with it).
        return LoadReport(
            device=self.device,
            dtype=dtype,
            details={
                "attn_implementation": kwargs["attn_implementation"],
                "device_map": str(getattr(self.model, "hf_device_map", None) or self.device),
                "torch_threads": torch.get_num_threads(),
                **quantization.load_details(method, self.model),
                **self._configure_engine(max_model_len, batch_size),
            },
        )

    def _configure_engine(self, max_model_len: int, batch_size: int) -> dict[str, Any]:
        """Resolve the engine path and where compiled code is cached; returns the load report's facts."""
        from transformers import CompileConfig

        self.max_cache_len = int(max_model_len)
        self.batch_size = int(batch_size)
        if self.serving:
            if self.settings.get("batching", "fixed") != "fixed":
                log.info(
                    "grid.batching=%s has no effect under a request rate: continuous batching forms the batches",
                    self.settings.get("batching"),
                )
            # self.path stays the uncompiled dynamic default: no static cache, nothing compiled by us.
            return {
                "engine_path": continuous_batching.ENGINE_PATH,
                "cache_implementation": "paged",
                "compile_mode": None,
                "compile_backend": None,
                "stop_check": None,
                "static_cache_len": None,
                "compile_cache_dirs": {},
            }
        self.path = resolve_engine_path(self.config, self.device)
        if self.path.stop_check == "deferred":
            reason = stop_check.unavailable_reason(self.device, self.path.cache_implementation)
            if reason:
                raise ConfigError(
                    f"{SETTINGS_KEY}.stop_check", f"is 'deferred' but {reason}", "Use 'auto' or 'per_step'."
                )
        cache_dirs: dict[str, str] = {}
        if self.path.compiled:
            self._compile_config = CompileConfig(mode=self.path.compile_mode, backend=self.path.compile_backend)
            if self.device != "cuda":
                # transformers compiles only on accelerators unless told otherwise (its own testing flag).
                self._compile_config._compile_all_devices = True
            cache_dirs = self._set_compile_cache_dirs()
        return {
            "engine_path": self.path.label,
            "cache_implementation": self.path.cache_implementation,
            "compile_mode": self.path.compile_mode,
            "compile_backend": self.path.compile_backend if self.path.compiled else None,
            "stop_check": self.path.stop_check,
            "static_cache_len": self.max_cache_len if self.path.cache_implementation == "static" else None,
            "compile_cache_dirs": cache_dirs,
        }

    def _set_compile_cache_dirs(self) -> dict[str, str]:
        """Point inductor's and triton's caches into compile_cache_dir (under resources/, so cycles and
        reruns reuse compiled kernels), unless the user exported their own; read before compiling."""
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        root = self.settings.get("compile_cache_dir")
        if root:
            for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
                current = os.environ.get(name)
                # inductor writes its own default into the environment the first time it looks: that
                # value is torch's, not the user's, and is replaced.
                if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
                    os.environ[name] = str(Path(root) / sub)
        names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
        return {name: os.environ[name] for name in names if name in os.environ}

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
            kwargs.update(
                do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k or None
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.path.cache_implementation == "static":
            # Our own StaticCache goes in per batch; a cache_implementation from the model's generation
            # config would conflict with it.
            kwargs["cache_implementation"] = None
            if self.path.compiled:
                kwargs["compile_config"] = self._compile_config
            else:
                kwargs["disable_compile"] = True  # generate would auto-compile over a static cache on CUDA
        # The returned cache is how the dynamic path's KV bytes are observed (memory_report).
        kwargs["return_dict_in_generate"] = True
        return kwargs

    @contextlib.contextmanager
    def generate_scope(self) -> Iterator[stop_check.Scope]:
        """What every `generate` of this engine path runs inside, ours and the bare reference's alike:
        inference mode and the engine path's stop check."""
        import torch

        with torch.inference_mode(), stop_check.stop_check(self.path.stop_check) as scope:
            yield scope

    def reference_generate_call(self, batch: list[Request], decoding: DecodingSettings) -> tuple[Any, dict[str, Any]]:
        """(inputs, kwargs) for transformers' own `generate` with this engine path's cache and compile
        settings and nothing of ours: no streamer, no cache we own (generate builds and reuses its own
        static cache), no per-request bookkeeping. The reference that workflow/benchmarks/
        harness_overhead.py measures the harness against; `model.generate(**inputs, **kwargs)`."""
        kwargs = self._generation_kwargs(decoding)
        kwargs.pop("return_dict_in_generate")
        if self.path.cache_implementation == "static":
            kwargs["cache_implementation"] = "static"
        ids, mask = self._pad_left(self._rows(batch, self.batch_size or len(batch)))
        return {"input_ids": ids, "attention_mask": mask}, kwargs

    def _pad_left(self, batch: list[Request]):
        import torch

        width = _width(batch)
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

    def plan_batches(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[list[Request]]:
        """The batches generate() runs for these requests (the harness passes them to compile())."""
        return batches_for_settings(requests, batch_size, self.settings, decoding.max_output_tokens)

    def _rows(self, batch: list[Request], batch_size: int) -> list[Request]:
        """The static cache has a fixed batch dimension: a smaller batch gets dummy rows, copies of its
        first request (real prompts, so no fully masked row makes NaNs), whose outputs are dropped."""
        if self.path.cache_implementation != "static" or len(batch) >= batch_size:
            return list(batch)
        return list(batch) + [batch[0]] * (batch_size - len(batch))

    def _static_cache_for(self, rows: int):
        """The fast path's one cache, allocated once per batch size; a new batch size (never within
        one experiment) gets a new cache, hence new shapes and a recompilation."""
        from transformers import StaticCache

        if self._static_cache is None or self._static_cache_batch != rows:
            self._static_cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self._static_cache_batch = rows
        return self._static_cache

    def _run_batch(self, rows: list[Request], decoding: DecodingSettings, kwargs: dict[str, Any]):
        """One `generate` call: (new token ids per row, step arrival times, submission time)."""
        import torch

        ids, mask = self._pad_left(rows)
        width = ids.shape[1]
        call_kwargs = dict(kwargs)
        if self.path.cache_implementation == "static":
            if width + decoding.max_output_tokens > self.max_cache_len:
                raise BackendError(
                    f"a prompt of {width} tokens plus max_output_tokens {decoding.max_output_tokens} does not fit "
                    f"the static cache of {self.max_cache_len} tokens (the model's max_model_len); raise "
                    f"max_model_len or lower max_input_tokens / max_output_tokens"
                )
            call_kwargs["past_key_values"] = self._static_cache_for(len(rows))
        step_clock = _StepClock()
        submitted = clock.now()
        try:
            with self.generate_scope() as scope:
                if "past_key_values" in call_kwargs:
                    call_kwargs["past_key_values"].reset()  # in place: the captured addresses stay valid
                output = self.model.generate(input_ids=ids, attention_mask=mask, streamer=step_clock, **call_kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"out of GPU memory at batch size {len(rows)}: {exc}") from exc
        self.synchronize()
        if self.path.stop_check == "deferred" and not scope.deferred_calls:
            raise BackendError(
                "backend_settings.pytorch.stop_check is 'deferred' but this transformers' generate did not use "
                "its DeferredStopCheck; set stop_check to 'per_step'"
            )
        if self.path.cache_implementation == "dynamic" and output.past_key_values is not None:
            # At the end of generate the dynamic cache holds every token: its largest size.
            held = _cache_bytes(output.past_key_values)
            self._dynamic_kv_peak_bytes = max(self._dynamic_kv_peak_bytes or 0, held)
        new_tokens = output.sequences[:, width:].tolist()
        del output
        return new_tokens, step_clock.step_times_s, submitted

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        import torch
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no tqdm monitor thread in the measured process

        assert self.model is not None, "load() first"
        if self.serving:
            # Everything at once; the engine forwards up to the batch size it was started with.
            return self._run_continuous(requests, decoding, None)
        batches = self.plan_batches(requests, batch_size, decoding)
        kwargs = self._generation_kwargs(decoding)
        records: list[RequestRecord] = []
        torch.manual_seed(decoding.seed)
        for batch_index, batch in enumerate(tqdm(batches, desc="generate", unit="batch", mininterval=5)):
            new_tokens, step_times, submitted = self._run_batch(self._rows(batch, batch_size), decoding, kwargs)
            # zip stops at the real requests: dummy rows are neither recorded nor counted.
            for request, generated in zip(batch, new_tokens):
                n = self.count_output_tokens(generated, decoding.fixed_length)
                times = step_times[:n]
                records.append(
                    RequestRecord(
                        index=request.index,
                        input_tokens=request.input_tokens,
                        output_tokens=n,
                        # A request is finished when its own last counted token arrived (with EOS, rows of
                        # one batch end at different steps even though generate returns once for all).
                        submitted_s=submitted,
                        finished_s=times[-1] if times else submitted,
                        first_token_s=times[0] if times else None,
                        token_times_s=times,
                        output_token_ids=generated[:n],
                        batch_index=batch_index,
                        latency_source="host_clock_per_step",
                    )
                )
        return sorted(records, key=lambda r: r.index)

    # -- under a request rate: transformers' continuous batching --

    def serve(self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule) -> list[RequestRecord]:
        """Each request submitted to the continuous-batching engine at its due time."""
        if not self.serving:
            raise BackendError(
                "the pytorch backend serves arrival times through continuous batching, which it "
                "starts only with settings['serving'] true (llm_energy.measure.backend_settings)"
            )
        return self._run_continuous(requests, decoding, schedule)

    def _continuous_engine(self, decoding: DecodingSettings) -> continuous_batching.ContinuousBatchingEngine:
        """The running engine for this decoding; a decoding with other logits processors gets a new one."""
        assert self.model is not None, "load() first"
        engine, eos_ids = self._cb_engine, self.eos_token_ids()
        key = continuous_batching.decoding_key(decoding, eos_ids)
        if engine is not None and engine.key == key:
            return engine
        if engine is not None:
            log.info("decoding changed (%s -> %s): restarting continuous batching", engine.key, key)
            self._cb_engine = None
            engine.close()
        sizes = continuous_batching.EngineSizes.of(
            self.batch_size or 1, self.max_cache_len or 1, continuous_batching.default_page_size()
        )
        try:
            self._cb_engine = continuous_batching.ContinuousBatchingEngine(
                self.model,
                decoding,
                eos_ids,
                self.tokenizer.pad_token_id,
                sizes,
                seed=int(self.settings.get("seed") or 0),
            )
        except (ValueError, RuntimeError, MemoryError) as exc:  # transformers' own refusals of the config
            raise BackendError(f"transformers' continuous batching could not start: {exc}") from exc
        return self._cb_engine

    def _run_continuous(
        self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule | None
    ) -> list[RequestRecord]:
        if not requests:
            return []
        longest = max(r.input_tokens for r in requests)
        if self.max_cache_len is not None and longest + decoding.max_output_tokens > self.max_cache_len:
            raise BackendError(
                f"a prompt of {longest} tokens plus max_output_tokens {decoding.max_output_tokens} exceeds "
                f"max_model_len {self.max_cache_len}, what the paged cache holds per request; raise max_model_len "
                "or lower max_input_tokens / max_output_tokens"
            )
        records = self._continuous_engine(decoding).run(requests, decoding, schedule)
        return sorted(records, key=lambda r: r.index)

    # -- engine hooks of the harness --

    @property
    def engine_path(self) -> str:
        return continuous_batching.ENGINE_PATH if self.serving else self.path.label

    def compile(self, batches: list[list[Request]], decoding: DecodingSettings) -> dict[str, Any]:
        """Compile and capture the decoding step before the window. Its shapes depend only on the batch
        size and the cache length (the 4-D mask spans the whole static cache; the prefill is not
        compiled), so one batch at the padded batch size compiles everything the window will run. A
        second call at another prompt width proves it: it must compile nothing.
        Under a request rate: starts the continuous-batching engine (its paged cache, and the CUDA
        graphs transformers captures), so that no window pays for it."""
        if self.serving:
            engine = self._continuous_engine(decoding)
            return {"engine_path": self.engine_path, "compiled": False, "continuous_batching": engine.facts}
        facts: dict[str, Any] = {"engine_path": self.path.label, "compiled": self.path.compiled}
        if not self.path.compiled or not batches:
            return facts
        assert self.model is not None, "load() first"
        import torch

        rows = max(self.batch_size or 1, max(len(b) for b in batches))
        by_width = sorted((b for b in batches if b), key=_width)
        widest, narrowest = by_width[-1], by_width[0]
        # Every step runs: the graph and its CUDA-graph capture happen in the first decoding steps.
        fixed = dataclasses.replace(decoding, output_length="fixed")
        kwargs = self._generation_kwargs(fixed)
        torch.manual_seed(decoding.seed)
        start, before = clock.now(), compilation_counter()
        self._run_batch(self._rows(widest, rows), fixed, kwargs)
        first_done, after_first = clock.now(), compilation_counter()
        self._run_batch(self._rows(narrowest, rows), fixed, kwargs)
        end, after_second = clock.now(), compilation_counter()
        if after_second != after_first:
            log.warning(
                "the second compile call recompiled (%d frames): the window may recompile too",
                after_second - after_first,
            )
        facts.update(
            {
                "seconds": end - start,
                "first_call_s": first_done - start,
                "second_call_s": end - first_done,
                "shapes_compiled": [
                    {
                        "batch_size": rows,
                        "static_cache_len": self.max_cache_len,
                        "prompt_widths_run": sorted({_width(widest), _width(narrowest)}),
                    }
                ],
                "compilations": after_first - before,
                "recompilations": after_second - after_first,
                "compile_mode": self.path.compile_mode,
                "compile_backend": self.path.compile_backend,
            }
        )
        return facts

    def compilation_count(self) -> int | None:
        return compilation_counter()

    def _cuda_devices(self) -> list:
        import torch

        if self.model is None or not torch.cuda.is_available():
            return []
        return sorted({p.device for p in self.model.parameters() if p.device.type == "cuda"}, key=str)

    def reset_peak_memory(self) -> None:
        import torch

        for device in self._cuda_devices():
            torch.cuda.reset_peak_memory_stats(device)
        self._dynamic_kv_peak_bytes = None
        self._rss_reset = _reset_peak_rss()

    def memory_report(self) -> dict[str, Any]:
        import torch

        unavailable: dict[str, str] = {}
        devices = self._cuda_devices()
        if devices:
            peak_allocated = sum(torch.cuda.max_memory_allocated(d) for d in devices)
            peak_reserved = sum(torch.cuda.max_memory_reserved(d) for d in devices)
        else:
            peak_allocated = peak_reserved = None
            unavailable["peak_allocated_bytes"] = unavailable["peak_reserved_bytes"] = "no CUDA device in use"
        kv_bytes: int | None
        if self.serving:
            kv_bytes = self._cb_engine.kv_cache_bytes() if self._cb_engine is not None else None
            kv_source = "paged_cache_allocation"
            if kv_bytes is None:
                unavailable["kv_cache_bytes"] = "continuous batching has not started"
        elif self.path.cache_implementation == "static":
            kv_bytes = _cache_bytes(self._static_cache) if self._static_cache is not None else None
            kv_source = "static_cache_allocation"
            if not kv_bytes:
                kv_bytes = None
                unavailable["kv_cache_bytes"] = "the static cache is allocated at the first generate, not yet run"
        else:
            kv_bytes = self._dynamic_kv_peak_bytes
            kv_source = "dynamic_cache_at_end_of_largest_batch"
            if kv_bytes is None:
                unavailable["kv_cache_bytes"] = "no generate since the last reset"
        return {
            "peak_allocated_bytes": peak_allocated,
            "peak_reserved_bytes": peak_reserved,
            "weight_bytes": quantization.weight_bytes(self.model)["weight_bytes"] if self.model is not None else None,
            "kv_cache_bytes": kv_bytes,
            "kv_cache_source": kv_source,
            "peak_rss_bytes": _peak_rss_bytes(),
            # VmHWM is reset at the window's opening edge where Linux allows it; else it spans the process.
            "peak_rss_scope": "since_reset" if self._rss_reset else "since_process_start",
            "unavailable": unavailable,
        }

    def synchronize(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def close(self) -> None:
        import gc

        import torch

        if self._cb_engine is not None:
            engine, self._cb_engine = self._cb_engine, None
            engine.close()
        self.model = None
        self._static_cache = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
