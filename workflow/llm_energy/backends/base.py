"""The backend interface: what an inference engine must do for the harness, and nothing more.

A backend loads a model, generates for a list of requests and returns per-request token counts and
timestamps. It knows nothing about energy, files or Snakemake. The harness (llm_energy.measure)
owns the sequence setup -> warm-up -> window -> generate -> close and the energy session.
Timestamps are `llm_energy.clock.now()` values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DecodingSettings:
    """How tokens are chosen and when generation stops; the same for every backend."""

    mode: str = "greedy"  # "greedy" or "sampling"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    output_length: str = "fixed"  # "fixed": exactly max_output_tokens; "eos": stop at EOS
    max_output_tokens: int = 64
    seed: int = 0

    @property
    def fixed_length(self) -> bool:
        return self.output_length == "fixed"


@dataclass(frozen=True)
class Request:
    """One prompt to generate for. `prompt_token_ids` are already truncated to max_input_tokens."""

    index: int
    prompt_token_ids: tuple[int, ...]

    @property
    def input_tokens(self) -> int:
        return len(self.prompt_token_ids)


def tokenize_prompts(tokenizer: Any, prompts: list[str], max_input_tokens: int) -> list[Request]:
    """The input-token rule every backend shares: the model's tokenizer with its special tokens, then
    truncated to max_input_tokens. One rule, so backends report the same input tokens for a prompt."""
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    return [Request(index=i, prompt_token_ids=tuple(ids[:max_input_tokens])) for i, ids in enumerate(encoded)]


@dataclass
class RequestRecord:
    """What a backend observed for one request. Token counts exclude padding and anything after EOS.

    Timestamps are taken, where the backend can, when the token reaches the caller (`latency_source`
    says where they were taken; llm_energy.metrics defines the latencies computed from them):
    - submitted_s: the request handed to the engine;
    - first_token_s: its first output token;
    - finished_s: its OWN last output token (not the end of the batch it ran in: a request that
      stopped at EOS after 10 of 128 steps finished at step 10);
    - arrivals, one of (or neither, where only first and last token are known):
      chunk_times_s + chunk_tokens: when each chunk of tokens reached the caller and how many tokens it
      carried (a streaming engine merges tokens into one chunk when the caller lags behind);
      token_times_s: one time per output token, for backends that see every token on its own (each is
      then a chunk of one token).
    """

    index: int
    input_tokens: int
    output_tokens: int
    submitted_s: float
    finished_s: float
    first_token_s: float | None = None  # None where the backend cannot observe it
    token_times_s: list[float] | None = None  # arrival time of every output token (one token per step)
    output_token_ids: list[int] = field(default_factory=list)
    batch_index: int | None = None
    latency_source: str = "host_clock"  # where the timestamps came from
    chunk_times_s: list[float] | None = None  # arrival time of every streamed chunk (>= 1 token each)
    chunk_tokens: list[int] | None = None  # tokens carried by each chunk of chunk_times_s
    due_s: float | None = None  # under a load schedule: when the request arrived (was due to be submitted)

    def __post_init__(self) -> None:
        if self.chunk_times_s is not None:
            tokens = self.chunk_tokens if self.chunk_tokens is not None else [1] * len(self.chunk_times_s)
            if len(tokens) != len(self.chunk_times_s) or any(n < 1 for n in tokens):
                raise ValueError(
                    f"request {self.index}: chunk_tokens {tokens} must give a count >= 1 for "
                    f"each of the {len(self.chunk_times_s)} chunk_times_s"
                )
            self.chunk_tokens = list(tokens)

    @classmethod
    def streamed(
        cls,
        request: Request,
        submitted_s: float,
        chunk_times_s: list[float],
        chunk_tokens: list[int],
        token_ids: list[int],
        latency_source: str,
        due_s: float | None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> RequestRecord:
        """A streamed request: first and last token from its chunks' arrival times (none: the
        submission), counts from the token ids unless the engine reported its own."""
        return cls(
            index=request.index,
            input_tokens=request.input_tokens if input_tokens is None else input_tokens,
            output_tokens=len(token_ids) if output_tokens is None else output_tokens,
            submitted_s=submitted_s,
            finished_s=chunk_times_s[-1] if chunk_times_s else submitted_s,
            first_token_s=chunk_times_s[0] if chunk_times_s else None,
            chunk_times_s=chunk_times_s,
            chunk_tokens=chunk_tokens,
            output_token_ids=token_ids,
            latency_source=latency_source,
            due_s=due_s,
        )

    def arrivals(self) -> tuple[list[float], list[int]]:
        """(arrival time, tokens carried) of each chunk that reached the caller; empty where unknown."""
        if self.chunk_times_s is not None:
            return list(self.chunk_times_s), list(self.chunk_tokens or [])
        if self.token_times_s is not None:
            return list(self.token_times_s), [1] * len(self.token_times_s)
        return [], []

    @property
    def last_token_s(self) -> float:
        """This request's own last token: its last arrival where arrivals are known, else finished_s."""
        times, _ = self.arrivals()
        return times[-1] if times else self.finished_s

    @property
    def e2e_s(self) -> float:
        return self.last_token_s - self.submitted_s

    @property
    def queue_s(self) -> float | None:
        """How long the request waited between its arrival and its submission (a concurrency cap)."""
        return None if self.due_s is None else self.submitted_s - self.due_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.submitted_s


@dataclass
class LoadReport:
    """Facts the backend learnt while loading (shown in the run artifact)."""

    device: str
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)


# How an engine runs (Backend.execution). The harness and the rules follow the declaration: the GPUs
# a job is given, whether the harness launches one process per data-parallel shard, and whether it may
# create a CUDA context in its own process before the engine starts.
LAUNCH_IN_PROCESS = "in_process"  # the engine runs in the harness's process (transformers)
LAUNCH_DATA_PARALLEL = (
    "data_parallel_workers"  # the harness launches one worker process per GPU (llm_energy.data_parallel)
)
LAUNCH_TENSOR_PARALLEL = (
    "tensor_parallel_workers"  # the harness launches the ranks of one split model (llm_energy.data_parallel)
)
LAUNCH_ENGINE_PROCESSES = "engine_processes"  # the engine starts worker processes of its own (vLLM)
LAUNCH_SERVER = "server"  # a server process, launched as setup or attached (openai_server)
LAUNCH_MODES = (LAUNCH_IN_PROCESS, LAUNCH_DATA_PARALLEL, LAUNCH_TENSOR_PARALLEL, LAUNCH_ENGINE_PROCESSES, LAUNCH_SERVER)


@dataclass(frozen=True)
class Execution:
    """How one experiment's engine runs, as its backend declares it from its settings.

    `gpus` is what the job asks the allocator for (on a box with GPUs): one GPU per data-parallel
    replica times the GPUs one replica is split over (tensor x pipeline stages). `keys` names the
    backend_settings key each parallelism came from, for the message of a campaign that asks for more
    than the backend or the box can do.
    """

    launch: str
    harness_may_init_cuda: bool
    data_parallel: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # The job takes every GPU of the box: its engine runs on GPUs the allocator cannot hand out one by
    # one (an attached server's), so nothing may run beside it.
    whole_box: bool = False
    # launch data_parallel_workers / tensor_parallel_workers: the longest wait at a barrier of the workers.
    barrier_timeout_s: float | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launch not in LAUNCH_MODES:
            raise ValueError(f"launch {self.launch!r} is not one of {LAUNCH_MODES}")

    @property
    def gpus(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    def describe(self) -> dict[str, Any]:
        return {
            "launch": self.launch,
            "harness_may_init_cuda": self.harness_may_init_cuda,
            "data_parallel": self.data_parallel,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "gpus": self.gpus,
            "whole_box": self.whole_box,
        }


# Keys the harness adds to a backend's configured settings (llm_energy.measure.backend_settings): the
# experiment's seed and batching and the model's trust_remote_code, which live elsewhere in the config,
# the compile cache folder of the run, the run's folder for a backend's own logs (a server's), and
# `serving`: true when the windows submit through serve() (a request rate or a concurrency cap), for
# an engine that starts another path for it. Everything else is backend_settings.<backend> as configured.
HARNESS_SETTINGS = ("seed", "trust_remote_code", "batching", "token_budget", "compile_cache_dir", "log_dir", "serving")


class Backend(ABC):
    """Base class of inference backends. Register implementations in llm_energy.backends."""

    name: str = ""

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = dict(settings or {})

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here, else why not and how to install it."""
        return None

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        """Raise ConfigError for backend_settings.<name> that the schema cannot judge (an optional package
        a setting needs, a combination that cannot work). Called before any job runs."""

    @abstractmethod
    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        """Load weights and start the engine. Called once, outside the measurement window.

        `batch_size` is the campaign's batch size: engines that size their scheduler at start (vLLM's
        max_num_seqs) use it; the others may ignore it.
        """

    @abstractmethod
    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        """Turn prompts into requests with the model's tokenizer, truncated to max_input_tokens."""

    @abstractmethod
    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        """Generate for all requests (batched as the backend and `batch_size` allow)."""

    # -- how the engine runs (Execution): launch mode, CUDA in the harness, parallelism --

    # What the backend can run. A campaign whose settings ask for a parallelism the backend does not
    # support is refused before any job (llm_energy.config), naming the key.
    supports_data_parallel: bool = False
    supports_tensor_parallel: bool = False

    @classmethod
    def execution(cls, settings: dict[str, Any]) -> Execution:
        """How this backend runs with `settings` (backend_settings.<name>, a variant's applied)."""
        return Execution(launch=LAUNCH_IN_PROCESS, harness_may_init_cuda=True)

    # Settings that leave an experiment's id (llm_energy.config.experiment_id) at the value given here
    # (keys added after ids were fixed: the ids of campaigns without them stay as they were), or always
    # (keys that never change what is measured, such as a timeout).
    id_neutral_settings: dict[str, Any] = {}
    id_excluded_settings: tuple[str, ...] = ()

    @classmethod
    def identity_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings an experiment's id hashes."""
        return {
            k: v
            for k, v in settings.items()
            if k not in cls.id_excluded_settings
            and not (k in cls.id_neutral_settings and cls.id_neutral_settings[k] == v)
        }

    # -- load: requests submitted at arrival times (llm_energy.load) --

    # Whether serve() honours a schedule of arrival times (online engines and servers do; static
    # batches cannot). A campaign with a request rate for a backend without it is refused before any job.
    supports_schedule: bool = False

    @classmethod
    def schedule_unsupported_reason(cls, settings: dict[str, Any]) -> str | None:
        """None when serve() takes arrival times with these settings, else why not (shown before any job)."""
        return None if cls.supports_schedule else "it runs static batches only"

    def serve(self, requests: list[Request], decoding: DecodingSettings, schedule: Any) -> list[RequestRecord]:
        """Submit each request at its due time (`schedule`: an llm_energy.load.Schedule), without waiting
        for earlier ones; each record's `due_s` is its arrival time."""
        from llm_energy.errors import BackendError

        raise BackendError(f"backend '{self.name}' cannot submit requests at arrival times (static batches)")

    # -- optional hooks the harness calls; the defaults suit an engine with nothing to report --

    def measured_gpus(self, devices: list[Any]) -> list[str] | None:
        """UUIDs of the GPUs to measure, where the backend knows them better than the harness (a server
        it attached to, on GPUs of its own); None: the GPUs holding this job's processes."""
        return None

    @property
    def engine_path(self) -> str:
        """A short label of the code path that generates ("eager", "fast", "cuda_graphs", ...):
        recorded in the artifacts, the summary and the figures so that paths are never mixed up."""
        return "default"

    def processes(self) -> list[dict[str, Any]]:
        """Processes of the engine besides the harness's ({role, pid, gpus}), for the run's topology."""
        return []

    def compile(self, batches: list[list[Request]], decoding: DecodingSettings) -> dict[str, Any]:
        """Compile and capture every shape the window will see (the harness passes the measured
        batches, and calls this inside the `compile` setup window, after load and before warm-up).
        Returns facts for the artifact. Engines that compile inside `load` do nothing here."""
        return {}

    def compilation_count(self) -> int | None:
        """A counter that grows with every (re)compilation, or None where there is none. The harness
        reads it at both window edges: a change flags the run `recompiled_in_window`."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory interval (called at a window's opening edge)."""

    def memory_report(self) -> dict[str, Any]:
        """Memory figures since the last reset (bytes): peak_allocated_bytes, peak_reserved_bytes,
        weight_bytes, kv_cache_bytes, peak_rss_bytes; None where unknown. Read at the closing edge."""
        return {}

    def synchronize(self) -> None:
        """Wait until all device work has finished (called at window edges)."""

    def close(self) -> None:
        """Free the engine and device memory."""
