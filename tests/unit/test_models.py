"""Tests of the models stage: builtin tiny models, local folders, hub offline behaviour, manifests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from llm_energy import models
from llm_energy.artifacts import read_json_artifact, validate_data
from llm_energy.errors import ArtifactError, ConfigError, SourceUnavailableError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """Offline hub settings and an empty HF_HOME for every test of this module."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HF_TOKEN", raising=False)
        yield home


@pytest.fixture(autouse=True)
def _offline(hf_env):
    yield


@pytest.fixture(scope="module")
def built(hf_env, tmp_path_factory) -> dict[str, Path]:
    """One builtin model per architecture, built once for the module: {architecture: out_dir}."""
    out: dict[str, Path] = {}
    for architecture in models.BUILTIN_ARCHITECTURES:
        out_dir = tmp_path_factory.mktemp(f"builtin-{architecture}")
        models.prepare_model(
            f"tiny-{architecture}", {"source": "builtin", "architecture": architecture, "seed": 0}, out_dir
        )
        out[architecture] = out_dir
    return out


def _tiny_spec(**overrides) -> dict:
    # Smaller than the defaults (2 layers) to keep the determinism builds quick.
    return {"source": "builtin", "architecture": "llama", "seed": 0, "num_layers": 2, **overrides}


# ---------------------------------------------------------------------------------------------
# builtin


@pytest.mark.parametrize("architecture", models.BUILTIN_ARCHITECTURES)
def test_builtin_model_reloads_and_generates_exactly_n_tokens_with_left_padding(built, architecture):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest_path = built[architecture] / "manifest.json"
    folder = models.resolve_model_path(manifest_path)
    assert folder == (built[architecture] / "weights").resolve()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    assert tokenizer.padding_side == "left"
    assert model.config.bos_token_id == tokenizer.bos_token_id == 1
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 0

    prompts = ["Hi!", "Explain how a transformer model turns a prompt into tokens, step by step."]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    # Left padding: the short prompt's padding sits at the start, every row ends with real tokens.
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id
    assert batch["input_ids"][1, 0] == tokenizer.bos_token_id  # BOS prepended to the full-length row

    new_tokens = 7
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + new_tokens)
    generated = out[:, batch["input_ids"].shape[1] :]
    assert (generated != tokenizer.pad_token_id).all()

    data = models.read_model_manifest(manifest_path)
    assert data["parameter_count"] == sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    if architecture == "gpt2":
        embedding += model.transformer.wpe.weight.numel()  # learned position embeddings
        assert data["config"]["tie_word_embeddings"] is True
    else:
        embedding += model.get_output_embeddings().weight.numel()  # untied lm_head
        assert data["config"]["tie_word_embeddings"] is False
    assert data["non_embedding_parameter_count"] == data["parameter_count"] - embedding


@pytest.mark.parametrize("architecture", models.BUILTIN_ARCHITECTURES)
def test_builtin_manifest_records_defaults_and_files(built, architecture):
    data = models.read_model_manifest(built[architecture])
    expected_kv = 2 if architecture == "llama" else 4
    expected_intermediate = 688 if architecture == "llama" else 1024
    assert data["config"] == {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": expected_kv,
        "head_dim": 64,
        "intermediate_size": expected_intermediate,
        "vocab_size": data["tokenizer"]["vocab_size_tokens"],
        "max_position_embeddings": 2048,
        "tie_word_embeddings": architecture == "gpt2",
    }
    assert data["architecture"]["model_type"] == architecture
    assert data["model_path"] == "weights" and data["revision"] is None
    assert data["torch_dtype"] == "float32"
    assert data["trust_remote_code"] is False
    assert data["parameter_count_method"] == "meta_instantiation"
    assert data["tokenizer"]["corpus"] == "llm_energy/data/bundled_prompts.jsonl"
    assert data["tokenizer"]["special_token_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert data["spec"]["seed"] == 0 and data["spec"]["tokenizer_vocab_size"] == 2048
    weights = built[architecture] / "weights"
    assert set(data["files"]) == {p.name for p in weights.iterdir()}
    assert "model.safetensors" in data["files"] and "tokenizer.json" in data["files"]
    # No staging folder left behind next to the weights.
    assert sorted(p.name for p in built[architecture].iterdir()) == ["manifest.json", "weights"]


def test_same_seed_gives_identical_files_and_other_seed_other_weights(hf_env, tmp_path):
    first = models.prepare_model("a", _tiny_spec(seed=3), tmp_path / "a")
    again = models.prepare_model("a", _tiny_spec(seed=3), tmp_path / "b")
    other = models.prepare_model("a", _tiny_spec(seed=4), tmp_path / "c")
    assert first["files"] == again["files"]
    assert other["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    # The tokenizer depends on the corpus only, not on the seed.
    assert other["files"]["tokenizer.json"] == first["files"]["tokenizer.json"]


def test_rebuild_replaces_weights_in_place(hf_env, tmp_path):
    models.prepare_model("a", _tiny_spec(seed=1), tmp_path)
    data = models.prepare_model("a", _tiny_spec(seed=2, save_dtype="bfloat16"), tmp_path)
    assert data["torch_dtype"] == "bfloat16"
    on_disk = {p.name: p for p in (tmp_path / "weights").iterdir()}
    assert set(on_disk) == set(data["files"])
    assert models.read_model_manifest(tmp_path)["files"] == data["files"]
    # bfloat16 halves the weights file against float32 of the same dims.
    f32 = models.prepare_model("a", _tiny_spec(seed=2), tmp_path / "f32")
    size_bf16 = (tmp_path / "weights" / "model.safetensors").stat().st_size
    size_f32 = (tmp_path / "f32" / "weights" / "model.safetensors").stat().st_size
    assert size_bf16 < 0.6 * size_f32
    assert f32["parameter_count"] == data["parameter_count"]


def test_one_billion_llama_dims_count_without_building():
    """A ~1 B Llama is described by dims alone; its count matches the analytic formula exactly."""
    spec = models.parse_spec(
        "big",
        {
            "source": "builtin",
            "architecture": "llama",
            "hidden_size": 2048,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "save_dtype": "bfloat16",
        },
    )
    config = models.builtin_model_config(spec, spec.vocab_size, {"pad": 0, "bos": 1, "eos": 2})
    start = time.perf_counter()
    count = models.count_parameters(config)
    assert time.perf_counter() - start < 10  # meta device: no 5 GB allocation
    h, layers, inter, vocab, kv_dim = 2048, 16, 8192, 128256, 8 * 64
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h  # q,o + k,v + gated MLP + 2 norms
    expected = layers * per_layer + h + 2 * vocab * h  # final norm, embedding, untied lm_head
    assert count.total == expected
    assert count.non_embedding == expected - 2 * vocab * h
    assert models.key_dims(config)["num_key_value_heads"] == 8


def test_llama_3_2_1b_dims_with_tied_embeddings_have_its_parameter_count():
    """tie_word_embeddings: the Llama-3.2-1B shape (1,235,814,400 parameters) from dims alone."""
    spec = models.parse_spec(
        "l1b",
        {
            "source": "builtin",
            "architecture": "llama",
            "hidden_size": 2048,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
        },
    )
    config = models.builtin_model_config(spec, spec.vocab_size, {"pad": 0, "bos": 1, "eos": 2})
    assert config.tie_word_embeddings is True
    assert models.count_parameters(config).total == 1_235_814_400
    gpt2 = models.parse_spec("g", {"source": "builtin", "architecture": "gpt2"})
    assert models.builtin_model_config(gpt2, 512, {"pad": 0, "bos": 1, "eos": 2}).tie_word_embeddings is True


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"source": "builtin", "architecture": "mamba"}, "models.m.architecture"),
        ({"source": "builtin", "architecture": "gpt2", "num_kv_heads": 2}, "models.m.num_kv_heads"),
        ({"source": "builtin", "hidden_size": 250, "num_heads": 4}, "models.m.num_heads"),
        ({"source": "builtin", "num_heads": 4, "num_kv_heads": 3}, "models.m.num_kv_heads"),
        ({"source": "builtin", "num_layers": True}, "models.m.num_layers"),
        ({"source": "builtin", "save_dtype": "float8"}, "models.m.save_dtype"),
        ({"source": "builtin", "tokenizer_vocab_size": 100}, "models.m.tokenizer_vocab_size"),
        ({"source": "ftp"}, "models.m.source"),
        ({"source": "hub", "revision": "main"}, "models.m.id"),
        ({"source": "local"}, "models.m.path"),
    ],
)
def test_invalid_specs_name_the_config_key(spec, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        models.prepare_model("m", spec, tmp_path)
    assert info.value.key == key
    assert not (tmp_path / "manifest.json").exists()


def test_vocab_size_below_tokenizer_size_is_a_config_error(hf_env, tmp_path):
    with pytest.raises(ConfigError) as info:
        models.prepare_model("m", _tiny_spec(vocab_size=300), tmp_path)
    assert info.value.key == "models.m.vocab_size"
    assert "tokenizer" in str(info.value)
    assert not (tmp_path / "weights").exists()
    assert [p for p in tmp_path.iterdir()] == []  # the staging folder is cleaned up


# ---------------------------------------------------------------------------------------------
# local


def test_local_source_points_at_folder_and_hashes_it(built, tmp_path):
    folder = built["llama"] / "weights"
    data = models.prepare_model("mine", {"source": "local", "path": str(folder)}, tmp_path)
    builtin = models.read_model_manifest(built["llama"])
    assert data["model_path"] == str(folder.resolve())
    assert Path(data["model_path"]).is_absolute()
    assert data["files"] == builtin["files"]
    assert data["parameter_count"] == builtin["parameter_count"]
    assert data["revision"] is None and data["tokenizer"] is None
    assert not (tmp_path / "weights").exists()  # nothing copied
    assert models.resolve_model_path(tmp_path / "manifest.json") == folder.resolve()


def test_local_source_missing_folder_or_config(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        models.prepare_model("mine", {"source": "local", "path": str(missing)}, tmp_path / "out")
    assert info.value.key == "models.mine.path"
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json") as info:
        models.prepare_model("mine", {"source": "local", "path": str(empty)}, tmp_path / "out")
    assert info.value.key == "models.mine.path"


def test_local_source_without_weights_is_refused(built, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(built["gpt2"] / "weights" / "config.json", folder / "config.json")
    with pytest.raises(ConfigError, match="no weight files") as info:
        models.prepare_model("mine", {"source": "local", "path": str(folder)}, tmp_path / "out")
    assert info.value.key == "models.mine.path"


def _local_copy_with_config(built: Path, dest: Path, **changes) -> Path:
    shutil.copytree(built / "weights", dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_local_custom_code_needs_trust_remote_code(built, tmp_path):
    folder = _local_copy_with_config(
        built["llama"],
        tmp_path / "custom",
        model_type="xmodel",
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"},
    )
    with pytest.raises(ConfigError, match="own code") as info:
        models.prepare_model("mine", {"source": "local", "path": str(folder)}, tmp_path / "out")
    assert info.value.key == "models.mine.trust_remote_code"


def test_local_unknown_architecture_names_the_path_key(built, tmp_path):
    folder = _local_copy_with_config(built["llama"], tmp_path / "unknown", model_type="xmodel")
    with pytest.raises(ConfigError, match="xmodel") as info:
        models.prepare_model("mine", {"source": "local", "path": str(folder)}, tmp_path / "out")
    assert info.value.key == "models.mine.path"


@pytest.mark.parametrize("architecture", models.BUILTIN_ARCHITECTURES)
def test_safetensors_header_fallback_agrees_with_meta_count(built, architecture):
    data = models.read_model_manifest(built[architecture])
    count = models.count_parameters_from_headers(built[architecture] / "weights")
    assert count.method == "safetensors_header"
    assert (count.total, count.non_embedding) == (data["parameter_count"], data["non_embedding_parameter_count"])


# ---------------------------------------------------------------------------------------------
# hub


def test_hub_missing_revision_asks_to_pin_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        models.prepare_model("h", {"source": "hub", "id": "org/model"}, tmp_path)
    assert info.value.key == "models.h.revision"
    assert "commit sha" in str(info.value) and "Pin" in str(info.value)


def test_hub_offline_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(SourceUnavailableError) as info:
        models.prepare_model("h", {"source": "hub", "id": "org/not-cached", "revision": FAKE_COMMIT}, tmp_path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "org/not-cached" in message and "offline" in message
    assert "source: local" in message and "HF_HOME" in message
    assert not (tmp_path / "manifest.json").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_hub_unreachable_without_offline_mode_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(SourceUnavailableError, match="cannot connect"):
        models.prepare_model("h", {"source": "hub", "id": "org/model", "revision": "v1"}, tmp_path)
    assert time.perf_counter() - start < 5


def test_hub_model_from_populated_cache_offline(built, hf_env, tmp_path, monkeypatch):
    """A cache filled elsewhere (HF_HOME/hub layout) serves a tag offline; the token is never recorded."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    repo = hf_env / "hub" / "models--org--tiny-llama"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(parents=True)
    for file in (built["llama"] / "weights").iterdir():  # the hub cache stores symlinks into blobs
        blob = blobs / file.name
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(FAKE_COMMIT)

    data = models.prepare_model("h", {"source": "hub", "id": "org/tiny-llama", "revision": "v1"}, tmp_path)
    assert data["revision"] == FAKE_COMMIT
    assert data["model_path"] == "weights"
    assert data["files"] == models.read_model_manifest(built["llama"])["files"]
    assert data["spec"]["allow_patterns"] == list(models.DEFAULT_HUB_ALLOW_PATTERNS)
    assert not any(p.is_symlink() for p in (tmp_path / "weights").iterdir())
    assert "hf_secret_token_value" not in (tmp_path / "manifest.json").read_text()


# ---------------------------------------------------------------------------------------------
# manifest artifact


def test_manifest_is_a_valid_versioned_artifact(built):
    document = read_json_artifact(built["gpt2"] / "manifest.json", "model_manifest")
    assert document["schema"] == "llm_energy/model_manifest" and document["schema_version"] == 1
    assert document["provenance"]["inputs"]  # the tokenizer corpus is an input
    data = document["data"]
    validate_data("model_manifest", data)

    with pytest.raises(ArtifactError, match="unexpected_field"):
        validate_data("model_manifest", {**data, "unexpected_field": 1})
    with pytest.raises(ArtifactError, match="revision"):
        validate_data("model_manifest", {**data, "revision": "main"})  # must be a resolved sha
    broken = {**data}
    del broken["files"]
    with pytest.raises(ArtifactError, match="files"):
        validate_data("model_manifest", broken)


def test_resolve_model_path_reports_missing_weights(built, tmp_path):
    copy = tmp_path / "moved"
    copy.mkdir()
    shutil.copy(built["gpt2"] / "manifest.json", copy / "manifest.json")
    with pytest.raises(ArtifactError, match="download_model"):
        models.resolve_model_path(copy / "manifest.json")
    with pytest.raises(ArtifactError, match="not found"):
        models.read_model_manifest(tmp_path / "absent.json")
    assert json.loads((copy / "manifest.json").read_text())["data"]["name"] == "tiny-gpt2"
