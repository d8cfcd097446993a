"""A client backend: any OpenAI-compatible server (vLLM serve, trtllm-serve, SGLang) over streaming HTTP.

The server is either launched by the job as setup (`server.command`: started in its own process group
with the model folder, port, dtype and length filled in, polled until `server.ready_path` answers 200,
its output kept in `server.log`, stopped when the job ends) or attached (`server.url`: a server that
already runs; `server.gpus` says which GPUs it uses, so that exactly those are measured).

Requests go to `/v1/completions` with the prompt as token ids (so every engine sees the same input
tokens), `stream: true` and `stream_options.include_usage`: token counts come from the server's own
`usage` (prompt_tokens, completion_tokens), timestamps from when each streamed chunk reaches this
process, as vLLM's serving benchmark takes them. Fixed output lengths use `ignore_eos` with
`min_tokens` = `max_tokens`, extensions of vLLM's server (SGLang's takes ignore_eos too); a server
that ignores them stops at EOS, which the usage counts show.

Settings (backend_settings.openai_server):
  server.command        list or string; placeholders {python} {model_dir} {port} {dtype} {max_model_len}
                        {model_name}
  server.url            attach instead of launch (http://host:port); server.gpus: GPU indices or UUIDs it uses
  server.port           port for a launched server (default 8000); server.env: its environment variables
  server.ready_path     readiness check path (default /health)
  server.ready_timeout_s  how long a launched server may take to answer (default 600)
  server.log            where a launched server's output goes (default: server.log in the run's folder)
  model_name            the served model name (default: the first of the server's /v1/models)
  request_timeout_s     per request (default 600)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_energy import clock
from llm_energy.backends.base import (
    HARNESS_SETTINGS,
    LAUNCH_SERVER,
    Backend,
    DecodingSettings,
    Execution,
    LoadReport,
    Request,
    RequestRecord,
    tokenize_prompts,
)
from llm_energy.config_schema import validate_section
from llm_energy.errors import BackendError, ConfigError
from llm_energy.load import Schedule, run_on_schedule

log = logging.getLogger(__name__)

KEY = "backend_settings.openai_server"
SCHEMA_NODE = "#/properties/backend_settings/properties/openai_server"
LOG_TAIL_LINES = 30
STOP_TIMEOUT_S = 20.0
# A launched server that dropped the connection is given this long to exit before the error says so.
DISCONNECT_GRACE_S = 5.0


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return "(no server log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(the server wrote nothing)"


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (the user's server)
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


class ServerProcess:
    """A server the job launched: its own process group, its log, stopped on close."""

    def __init__(self, command: Sequence[str], log_path: Path, env: dict[str, Any] | None = None):
        self.command = list(command)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 (kept open for the server's lifetime)
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **{k: str(v) for k, v in (env or {}).items()}},
        )

    def exited(self, within_s: float = 0.0) -> int | None:
        """The exit code, or None while it runs; waits up to within_s for it to exit (a server whose
        connection just dropped is usually still dying)."""
        try:
            return self.process.wait(within_s) if within_s > 0 else self.process.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class OpenAIServerBackend(Backend):
    name = "openai_server"

    def __init__(self, settings: dict[str, Any] | None = None):
        super().__init__(settings)
        # backend_settings.openai_server with the schema's defaults (the harness's own keys left out)
        self.config = validate_section(
            SCHEMA_NODE, {k: v for k, v in self.settings.items() if k not in HARNESS_SETTINGS}
        )
        self.server_settings: dict[str, Any] = self.config["server"]
        self.base_url: str | None = None
        self.model_name: str | None = None
        self.process: ServerProcess | None = None
        self.tokenizer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: Any = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("aiohttp") else "aiohttp is not installed: pip install aiohttp"

    @classmethod
    def execution(cls, settings: dict[str, Any]) -> Execution:
        # A launched server is a child of the job and sees the job's GPUs; an attached one runs on GPUs
        # of its own (server.gpus), outside the allocator: nothing else may run on the box beside it.
        attached = bool((settings.get("server") or {}).get("url"))
        return Execution(launch=LAUNCH_SERVER, harness_may_init_cuda=True, whole_box=attached)

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        server = settings.get("server") or {}
        if bool(server.get("command")) == bool(server.get("url")):
            raise ConfigError(
                f"{KEY}.server",
                "set exactly one of server.command (launch a server as setup) and server.url (attach to a running one)",
                "e.g. server: {command: 'vllm serve {model_dir} --port {port}'} or "
                "server: {url: 'http://127.0.0.1:8000', gpus: [0]}",
            )
        if server.get("url") and not str(server["url"]).startswith(("http://", "https://")):
            raise ConfigError(
                f"{KEY}.server.url", f"{server['url']!r} is not an http(s) URL", "write it as http://host:port"
            )

    # -- load: launch or attach ------------------------------------------------------------------

    def command(self, model_dir: Path, dtype: str, max_model_len: int) -> list[str]:
        raw = self.server_settings["command"]
        parts = shlex.split(raw) if isinstance(raw, str) else [str(p) for p in raw]
        values = {
            "python": sys.executable,
            "model_dir": str(model_dir),
            "port": str(self.server_settings["port"]),
            "dtype": dtype,
            "max_model_len": str(max_model_len),
            "model_name": self.config["model_name"] or "model",
        }
        try:
            return [p.format(**values) for p in parts]
        except KeyError as exc:
            raise ConfigError(
                f"{KEY}.server.command", f"unknown placeholder {exc} in {raw!r}", f"use only {{{'}, {'.join(values)}}}"
            ) from None

    def load(self, model_dir: Path, dtype: str, max_model_len: int, batch_size: int) -> LoadReport:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        launched = bool(self.server_settings.get("command"))
        if launched:
            port = int(self.server_settings["port"])
            if port_in_use(port):
                raise BackendError(
                    f"{KEY}.server.port: port {port} is already in use on this machine; stop what "
                    f"listens there or choose another server.port"
                )
            self.base_url = f"http://127.0.0.1:{port}"
            log_dir = Path(self.settings.get("log_dir") or ".")
            log_path = Path(self.server_settings["log"] or log_dir / "server.log")
            self.process = ServerProcess(
                self.command(model_dir, dtype, max_model_len), log_path, self.server_settings["env"]
            )
            log.info(
                "started server (pid %d): %s; log %s",
                self.process.process.pid,
                shlex.join(self.process.command),
                log_path,
            )
        else:
            self.base_url = str(self.server_settings["url"]).rstrip("/")
        self._wait_ready(launched)
        self.model_name = self.config["model_name"] or self._served_model()
        self._loop = asyncio.new_event_loop()
        return LoadReport(
            device="server",
            dtype=dtype,
            details={
                "server_url": self.base_url,
                "launched": launched,
                "model_name": self.model_name,
                "server_command": shlex.join(self.process.command) if self.process else None,
                "server_log": str(self.process.log_path) if self.process else None,
                "server_gpus": self.server_settings["gpus"],
            },
        )

    def _wait_ready(self, launched: bool) -> None:
        url = self.base_url + self.server_settings["ready_path"]
        timeout_s = float(self.server_settings["ready_timeout_s"]) if launched else 10.0
        deadline = time.monotonic() + timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.exited() is not None:
                code = self.process.exited()
                self.close()
                raise BackendError(
                    f"the server exited with code {code} before it was ready "
                    f"({KEY}.server.command); its log ends:\n{log_tail(self.process.log_path)}"
                )
            try:
                status, _ = _http_get(url, timeout_s=5.0)
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.5)
        if self.process is not None:
            tail = log_tail(self.process.log_path)
            self.close()
            raise BackendError(
                f"the server did not answer {url} within {KEY}.server.ready_timeout_s="
                f"{timeout_s:g} s ({last_error}); it was stopped. Its log ends:\n{tail}"
            )
        raise BackendError(f"{KEY}.server.url: {url} does not answer ({last_error}); is the server running?")

    def _served_model(self) -> str:
        status, body = _http_get(self.base_url + "/v1/models", timeout_s=10.0)
        models = (json.loads(body or b"{}").get("data") or []) if status == 200 else []
        if not models:
            raise BackendError(f"{self.base_url}/v1/models lists no model (HTTP {status}); set {KEY}.model_name")
        return models[0]["id"]

    def measured_gpus(self, devices: list[Any]) -> list[str] | None:
        """An attached server's GPUs (server.gpus, indices or UUIDs); a launched one's are found as the
        job's own (the server is a child process)."""
        wanted = self.server_settings["gpus"]
        if self.process is not None or not wanted:
            return None
        chosen = [d.uuid for d in devices if d.index in wanted or d.uuid in wanted]
        unknown = [g for g in wanted if not any(g in (d.index, d.uuid) for d in devices)]
        if unknown:
            raise BackendError(
                f"{KEY}.server.gpus: {unknown} match no GPU this job sees ({[(d.index, d.uuid) for d in devices]})"
            )
        return chosen

    def tokenize(self, prompts: list[str], max_input_tokens: int) -> list[Request]:
        return tokenize_prompts(self.tokenizer, prompts, max_input_tokens)

    # -- generate ------------------------------------------------------------------------------

    def request_body(self, request: Request, decoding: DecodingSettings) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": list(request.prompt_token_ids),
            "max_tokens": decoding.max_output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "temperature": 0.0 if decoding.mode == "greedy" else decoding.temperature,
        }
        if decoding.mode != "greedy":
            body.update(top_p=decoding.top_p, seed=decoding.seed + request.index)
            if decoding.top_k:
                body["top_k"] = decoding.top_k
        if decoding.fixed_length:
            body.update(ignore_eos=True, min_tokens=decoding.max_output_tokens)
        return body

    async def _one(self, request: Request, decoding: DecodingSettings, due_s: float | None) -> RequestRecord:
        import aiohttp

        chunk_times: list[float] = []
        chunk_tokens: list[int] = []
        token_ids: list[int] = []
        usage: dict[str, Any] | None = None
        submitted = clock.now()
        async with self._session.post(
            self.base_url + "/v1/completions",
            json=self.request_body(request, decoding),
            timeout=aiohttp.ClientTimeout(total=float(self.config["request_timeout_s"])),
        ) as response:
            if response.status != 200:
                raise BackendError(
                    f"the server answered HTTP {response.status} to request {request.index}: "
                    f"{(await response.text())[:500]}"
                )
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                arrived = clock.now()
                event = json.loads(payload)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids")
                    if ids is None and not choice.get("text"):
                        continue  # a chunk that carries no token (e.g. only a finish reason)
                    count = len(ids) if ids is not None else 1
                    if count == 0:
                        continue
                    token_ids.extend(ids or [])
                    chunk_times.append(arrived)
                    chunk_tokens.append(count)
        if usage is None:
            raise BackendError(
                f"the server sent no usage for request {request.index} (it must honour "
                "stream_options.include_usage): token counts would be guesses"
            )
        # Token counts are the server's own usage, not our count of the streamed ids.
        return RequestRecord.streamed(
            request,
            submitted,
            chunk_times,
            chunk_tokens,
            token_ids,
            "openai_stream_arrival_at_caller",
            due_s,
            input_tokens=int(usage["prompt_tokens"]),
            output_tokens=int(usage["completion_tokens"]),
        )

    supports_schedule = True

    def generate(self, requests: list[Request], batch_size: int, decoding: DecodingSettings) -> list[RequestRecord]:
        """All requests at once, at most `batch_size` in flight (the offline load, over HTTP)."""
        return self.serve(requests, decoding, Schedule.closed_batches(len(requests), batch_size))

    def serve(self, requests: list[Request], decoding: DecodingSettings, schedule: Schedule) -> list[RequestRecord]:
        if self._loop is None:
            raise BackendError("OpenAIServerBackend: load() first")

        async def run_all() -> list[RequestRecord]:
            import aiohttp

            if self._session is None:
                self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            return await run_on_schedule(requests, schedule, lambda r, due: self._one(r, decoding, due))

        if self.process is not None and self.process.exited() is not None:
            raise BackendError(
                f"the server exited with code {self.process.exited()} during the run; its log "
                f"ends:\n{log_tail(self.process.log_path)}"
            )
        try:
            records = self._loop.run_until_complete(run_all())
        except BackendError:
            raise
        except Exception as exc:
            code = self.process.exited(within_s=DISCONNECT_GRACE_S) if self.process is not None else None
            why = (
                f"the server exited with code {code}; its log ends:\n{log_tail(self.process.log_path)}"
                if code is not None
                else f"{type(exc).__name__}: {exc}"
            )
            raise BackendError(f"streaming from {self.base_url} failed: {why}") from exc
        return sorted(records, key=lambda r: r.index)

    def close(self) -> None:
        if self._loop is not None:
            if self._session is not None:
                self._loop.run_until_complete(self._session.close())
                self._session = None
            self._loop.close()
            self._loop = None
        if self.process is not None:
            self.process.stop()
