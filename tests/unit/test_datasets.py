"""Unit tests of the datasets stage (llm_energy.datasets): every source, selection, manifest."""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

# Offline before anything imports huggingface_hub / datasets (they read these at import); the
# autouse fixture below sets them again per test, since llm_energy reads them at call time too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jsonschema
import pytest
from llm_energy import datasets as ds
from llm_energy.artifacts import SCHEMA_DIR, read_json_artifact
from llm_energy.datasets.lengths import bundled_words
from llm_energy.errors import ArtifactError, ConfigError, SourceUnavailableError

CATEGORIES = {"chat", "instruction", "summarization", "math", "code", "reasoning", "creative"}
PROVENANCE = {"experiment": None, "config_sha256": None, "inputs": {}}


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No network, and an empty private HF cache for each test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE trained on the bundled prompts, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in ds.BUNDLED_PROMPTS_PATH.read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(folder)
    return folder


def bundled_rows() -> list[dict]:
    return [json.loads(line) for line in ds.BUNDLED_PROMPTS_PATH.read_text(encoding="utf-8").splitlines()]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prepare(name: str, spec: dict, out_dir: Path, **kwargs) -> dict:
    base = {"sample_size": None, "seed": 0, "shuffle": False, "min_chars": None, "max_chars": None}
    return ds.prepare_dataset(name, {**base, **spec}, out_dir, provenance=PROVENANCE, **kwargs)


# ---------------------------------------------------------------------------------------------
# Bundled prompts


def test_bundled_file_has_enough_prompts_of_every_category():
    rows = bundled_rows()
    assert len(rows) >= 120
    assert {row["category"] for row in rows} == CATEGORIES
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(row["id"].startswith(row["category"] + "-") and row["prompt"].strip() for row in rows)
    long_passages = [
        row for row in rows if row["category"] == "summarization" and 300 <= len(row["prompt"].split()) <= 1600
    ]
    assert len(long_passages) >= 10
    word_counts = [len(row["prompt"].split()) for row in rows]
    assert min(word_counts) <= 6 and max(word_counts) >= 1000


def test_bundled_all_prompts_and_manifest_matches_schema(tmp_path):
    manifest = prepare("bundled", {"source": "bundled", "categories": None}, tmp_path)
    lines = read_lines(tmp_path / "prompts.jsonl")
    rows = bundled_rows()
    assert manifest["count"] == len(lines) == len(rows)
    assert [line["index"] for line in lines] == list(range(len(rows)))
    # shuffle off: the file order is kept
    assert [line["source_id"] for line in lines] == [row["id"] for row in rows]
    assert set(manifest["categories"]) == CATEGORIES
    assert sum(manifest["categories"].values()) == len(rows)
    assert manifest["token_length"] is None and manifest["tokenizer"] is None
    assert "tokenizer" in manifest["token_length_unavailable_reason"]
    assert manifest["hub_revision"] is None
    assert manifest["source_sha256"] is not None
    assert manifest["char_length"]["min"] <= manifest["char_length"]["p50"] <= manifest["char_length"]["max"]

    schema = json.loads((SCHEMA_DIR / "dataset_manifest.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    document = read_json_artifact(tmp_path / "manifest.json", "dataset_manifest")  # validates too
    assert document["schema"] == "llm_energy/dataset_manifest" and document["data"] == manifest
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**manifest, "unexpected": 1}, schema)


def test_bundled_sampling_is_seeded_and_deterministic(tmp_path):
    spec = {"source": "bundled", "sample_size": 15, "seed": 7, "shuffle": True}
    first = prepare("b", spec, tmp_path / "a")
    second = prepare("b", spec, tmp_path / "b")
    other_seed = prepare("b", {**spec, "seed": 8}, tmp_path / "c")
    assert first["count"] == 15
    assert first["prompts_sha256"] == second["prompts_sha256"]
    assert first["prompts_sha256"] != other_seed["prompts_sha256"]
    ids = [line["source_id"] for line in read_lines(tmp_path / "a" / "prompts.jsonl")]
    assert len(set(ids)) == 15
    assert ids != [row["id"] for row in bundled_rows()[:15]]  # shuffled, not the first 15
    # shuffle off: the first sample_size prompts in file order
    prepare("b", {**spec, "shuffle": False}, tmp_path / "d")
    unshuffled = [line["source_id"] for line in read_lines(tmp_path / "d" / "prompts.jsonl")]
    assert unshuffled == [row["id"] for row in bundled_rows()[:15]]


def test_bundled_categories_filter_and_errors(tmp_path):
    manifest = prepare("b", {"source": "bundled", "categories": ["math", "code"]}, tmp_path)
    assert set(manifest["categories"]) == {"math", "code"}
    with pytest.raises(ConfigError, match=r"datasets\.b\.categories.*poetry"):
        prepare("b", {"source": "bundled", "categories": ["poetry"]}, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"datasets\.b\.sample_size.*at most"):
        prepare("b", {"source": "bundled", "categories": ["math"], "sample_size": 500}, tmp_path / "y")
    with pytest.raises(ConfigError, match=r"datasets\.b\.source"):
        prepare("b", {"source": "ftp"}, tmp_path / "z")


def test_char_filters_drop_and_count(tmp_path):
    manifest = prepare("b", {"source": "bundled", "min_chars": 50, "max_chars": 500}, tmp_path)
    lengths = [len(line["prompt"]) for line in read_lines(tmp_path / "prompts.jsonl")]
    assert all(50 <= n <= 500 for n in lengths)
    assert manifest["dropped"]["min_chars"] > 0 and manifest["dropped"]["max_chars"] > 0
    assert manifest["count"] + manifest["dropped"]["min_chars"] + manifest["dropped"]["max_chars"] == len(
        bundled_rows()
    )
    with pytest.raises(ConfigError, match="no prompts left"):
        prepare("b", {"source": "bundled", "min_chars": 10**7}, tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# Synthetic prompts with a real tokenizer


def token_counts(tokenizer_dir: Path, prompts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]


def test_synthetic_fixed_lengths_are_exact(tmp_path, tokenizer_dir):
    spec = {
        "source": "synthetic",
        "count": 12,
        "seed": 1,
        "tokenizer_model": "tiny",
        "input_tokens": {"distribution": "fixed", "value": 64},
    }
    manifest = prepare("syn", spec, tmp_path, tokenizer_dir=tokenizer_dir)
    lines = read_lines(tmp_path / "prompts.jsonl")
    assert token_counts(tokenizer_dir, [line["prompt"] for line in lines]) == [64] * 12
    assert all(line["target_tokens"] == 64 for line in lines)
    assert len({line["prompt"] for line in lines}) == 12  # different start positions
    assert manifest["token_length"] == {"min": 64, "max": 64, "mean": 64.0, "p50": 64.0, "p90": 64.0}
    assert manifest["tokenizer"]["path"] == str(tokenizer_dir)
    assert manifest["token_length_unavailable_reason"] is None


def test_synthetic_distribution_exact_and_deterministic(tmp_path, tokenizer_dir):
    spec = {
        "source": "synthetic",
        "count": 40,
        "seed": 5,
        "tokenizer_model": "tiny",
        "input_tokens": {"distribution": "uniform", "min": 1, "max": 700},
    }
    first = prepare("syn", spec, tmp_path / "a", tokenizer_dir=tokenizer_dir)
    lines = read_lines(tmp_path / "a" / "prompts.jsonl")
    targets = [line["target_tokens"] for line in lines]
    assert token_counts(tokenizer_dir, [line["prompt"] for line in lines]) == targets
    assert all(1 <= t <= 700 for t in targets) and len(set(targets)) > 20
    second = prepare("syn", spec, tmp_path / "b", tokenizer_dir=tokenizer_dir)
    assert first["prompts_sha256"] == second["prompts_sha256"]
    third = prepare("syn", {**spec, "seed": 6}, tmp_path / "c", tokenizer_dir=tokenizer_dir)
    assert third["prompts_sha256"] != first["prompts_sha256"]


def test_synthetic_tiny_lengths_are_exact(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    builder = ds.ExactLengthPromptBuilder(tokenizer, bundled_words())
    for target in (1, 2, 3, 5, 17):
        for start in (0, 101, 2000):
            text = builder.build(target, start)
            assert text is not None and builder.count(text) == target, (target, start, text)


def test_synthetic_needs_a_tokenizer(tmp_path):
    spec = {
        "source": "synthetic",
        "count": 2,
        "tokenizer_model": "tiny",
        "input_tokens": {"distribution": "fixed", "value": 8},
    }
    with pytest.raises(ConfigError, match=r"datasets\.syn\.input_tokens.*tokenizer"):
        prepare("syn", spec, tmp_path)


def test_draw_token_lengths_bounds_and_means():
    key = "datasets.s.input_tokens"
    normal = ds.draw_token_lengths(
        {"distribution": "normal", "mean": 200, "std": 50, "min": 150, "max": 400}, 4000, random.Random(0), key
    )
    assert min(normal) >= 150 and max(normal) <= 400
    # truncation, not clipping: no pile-up at the lower bound
    assert normal.count(150) < 0.02 * len(normal)
    lognormal = ds.draw_token_lengths(
        {"distribution": "lognormal", "mean": 300, "sigma": 0.5, "min": 1, "max": 100000}, 4000, random.Random(0), key
    )
    assert 280 < statistics.mean(lognormal) < 320  # `mean` is the mean in tokens
    uniform = ds.draw_token_lengths({"distribution": "uniform", "min": 3, "max": 5}, 300, random.Random(1), key)
    assert set(uniform) == {3, 4, 5}
    assert ds.draw_token_lengths(
        {"distribution": "normal", "mean": 10, "std": 3}, 50, random.Random(2), key
    ) == ds.draw_token_lengths({"distribution": "normal", "mean": 10, "std": 3}, 50, random.Random(2), key)
    assert ds.draw_token_lengths({"distribution": "normal", "mean": 42.4, "std": 0}, 3, random.Random(), key) == [
        42,
        42,
        42,
    ]
    with pytest.raises(ConfigError, match=r"input_tokens\.sigma"):
        ds.draw_token_lengths({"distribution": "lognormal", "mean": 50}, 1, random.Random(), key)
    with pytest.raises(ConfigError, match=r"input_tokens\.max"):
        ds.draw_token_lengths({"distribution": "uniform", "min": 9, "max": 3}, 1, random.Random(), key)
    with pytest.raises(ConfigError, match=r"input_tokens\.distribution"):
        ds.draw_token_lengths({"distribution": "zipf"}, 1, random.Random(), key)
    with pytest.raises(ConfigError, match=r"input_tokens\.value"):
        ds.draw_token_lengths({"distribution": "fixed", "value": 0}, 1, random.Random(), key)
    # The shape is the config schema's: the same key and fix as in a campaign.
    with pytest.raises(ConfigError) as info:
        ds.draw_token_lengths({"distribution": "lognormal", "mean": 0, "sigma": 1}, 1, random.Random(), key)
    assert info.value.key == "datasets.s.input_tokens.mean" and "> 0" in info.value.fix
    with pytest.raises(ConfigError, match=r"datasets\.s\.input_tokens.*type object"):
        ds.draw_token_lengths("fixed", 1, random.Random(), key)


def test_token_length_stats_for_bundled_with_tokenizer(tmp_path, tokenizer_dir):
    manifest = prepare("b", {"source": "bundled", "categories": ["chat"]}, tmp_path, tokenizer_dir=tokenizer_dir)
    prompts = [line["prompt"] for line in read_lines(tmp_path / "prompts.jsonl")]
    counts = token_counts(tokenizer_dir, prompts)
    assert manifest["token_length"]["min"] == min(counts)
    assert manifest["token_length"]["max"] == max(counts)
    assert manifest["token_length"]["mean"] == pytest.approx(statistics.mean(counts))
    assert manifest["tokenizer"]["add_special_tokens"] is False


# ---------------------------------------------------------------------------------------------
# Local files


def test_txt_file_one_prompt_per_non_empty_line(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("first prompt\n\n   \nsecond prompt\r\nthird, with ünïcode\n", encoding="utf-8")
    manifest = prepare(
        "t", {"source": "file", "path": str(source), "format": None, "prompt_column": None}, tmp_path / "out"
    )
    lines = read_lines(tmp_path / "out" / "prompts.jsonl")
    assert [line["prompt"] for line in lines] == ["first prompt", "second prompt", "third, with ünïcode"]
    assert [line["source_id"] for line in lines] == ["prompts.txt:1", "prompts.txt:4", "prompts.txt:5"]
    assert manifest["spec"]["format"] == "txt"
    assert manifest["categories"] == {"uncategorized": 3}


def test_jsonl_auto_detects_column_case_insensitively_and_drops_empty(tmp_path):
    source = tmp_path / "data.jsonl"
    rows = [
        {"id": "q1", "Question": "What is 2+2?", "answer": "4", "category": "math"},
        {"id": "q2", "Question": "", "answer": "-"},
        {"id": "q3", "Question": "Name a prime.", "answer": "7"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = prepare("j", {"source": "file", "path": str(source)}, tmp_path / "out")
    lines = read_lines(tmp_path / "out" / "prompts.jsonl")
    assert [line["prompt"] for line in lines] == ["What is 2+2?", "Name a prime."]
    assert [line["source_id"] for line in lines] == ["q1", "q3"]  # the id column wins over line numbers
    assert [line["category"] for line in lines] == ["math", None]
    assert manifest["spec"]["prompt_column"] == "Question"
    assert manifest["dropped"]["empty"] == 1


def test_jsonl_candidate_order_and_bad_line(tmp_path):
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"question": "q?", "text": "the text"}) + "\n")
    prepare("j", {"source": "file", "path": str(source)}, tmp_path / "out")
    assert read_lines(tmp_path / "out" / "prompts.jsonl")[0]["prompt"] == "the text"  # "text" first
    source.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"datasets\.j\.path.*data\.jsonl line 2"):
        prepare("j", {"source": "file", "path": str(source)}, tmp_path / "bad")


def test_csv_explicit_column_with_multiline_field(tmp_path):
    source = tmp_path / "data.csv"
    source.write_text('id,body,text\n1,"Line one\nline two, with comma",short\n2,plain body,x\n')
    manifest = prepare("c", {"source": "file", "path": str(source), "prompt_column": "body"}, tmp_path / "out")
    lines = read_lines(tmp_path / "out" / "prompts.jsonl")
    assert [line["prompt"] for line in lines] == ["Line one\nline two, with comma", "plain body"]
    assert manifest["spec"]["prompt_column"] == "body" and manifest["spec"]["format"] == "csv"


def test_parquet_auto_detection_and_missing_column_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "data.parquet"
    pq.write_table(pa.table({"instruction": ["Do A", "Do B", None], "n": [1, 2, 3]}), source)
    manifest = prepare("p", {"source": "file", "path": str(source)}, tmp_path / "out")
    lines = read_lines(tmp_path / "out" / "prompts.jsonl")
    assert [line["prompt"] for line in lines] == ["Do A", "Do B"]
    assert lines[0]["source_id"] == "data.parquet:row0"
    assert manifest["spec"]["prompt_column"] == "instruction" and manifest["dropped"]["empty"] == 1

    with pytest.raises(ConfigError) as error:
        prepare("p", {"source": "file", "path": str(source), "prompt_column": "body"}, tmp_path / "x")
    assert error.value.key == "datasets.p.prompt_column"
    assert "'instruction'" in str(error.value) and "'n'" in str(error.value)

    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ConfigError, match=r"no prompt column found.*\['a', 'b'\]"):
        prepare("p", {"source": "file", "path": str(tmp_path / "nocol.parquet")}, tmp_path / "y")


def test_file_errors_name_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\.f\.path.*does not exist"):
        prepare("f", {"source": "file", "path": str(tmp_path / "missing.jsonl")}, tmp_path / "o")
    odd = tmp_path / "prompts.xml"
    odd.write_text("<p/>")
    with pytest.raises(ConfigError, match=r"datasets\.f\.format.*\.xml"):
        prepare("f", {"source": "file", "path": str(odd)}, tmp_path / "o")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.txt line 2 is not valid UTF-8"):
        prepare("f", {"source": "file", "path": str(latin)}, tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Hub


def test_hub_alias_resolution():
    gsm8k = ds.resolve_hub_target(
        "g", {"source": "hub", "id": "gsm8k", "config_name": None, "split": None, "revision": None}
    )
    assert (gsm8k.repo_id, gsm8k.config_name, gsm8k.split) == ("openai/gsm8k", "main", "test")
    assert gsm8k.alias.extract_prompt({"question": "Q?", "answer": "A"}) == "Q?"
    mmlu = ds.resolve_hub_target("m", {"id": "MMLU", "split": "validation"})
    assert (mmlu.repo_id, mmlu.config_name, mmlu.split) == ("cais/mmlu", "all", "validation")
    assert mmlu.alias.extract_category({"question": "q", "subject": "anatomy"}) == "anatomy"
    alpaca = ds.resolve_hub_target("a", {"id": "alpaca"})
    assert alpaca.repo_id == "tatsu-lab/alpaca"
    assert alpaca.alias.extract_prompt({"instruction": "Sort.", "input": "3 1 2"}) == "Sort.\n\n3 1 2"
    assert alpaca.alias.extract_prompt({"instruction": "Say hi.", "input": ""}) == "Say hi."
    sharegpt = ds.resolve_hub_target("s", {"id": "sharegpt"})
    assert sharegpt.repo_id == "anon8231489123/ShareGPT_Vicuna_unfiltered"
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "hi"},
        ]
    }
    assert sharegpt.alias.extract_prompt(row) == "hello"
    other = ds.resolve_hub_target("o", {"id": "someone/set", "revision": "abc"})
    assert (other.repo_id, other.split, other.alias, other.revision) == ("someone/set", "train", None, "abc")
    with pytest.raises(ConfigError, match=r"datasets\.x\.id"):
        ds.resolve_hub_target("x", {"id": "not-an-alias"})


def test_hub_offline_fails_fast_with_instructions(tmp_path):
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError) as error:
        prepare("g", {"source": "hub", "id": "gsm8k"}, tmp_path / "out")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "cannot be reached" in message and "openai/gsm8k" in message
    assert "hf download --repo-type dataset openai/gsm8k" in message
    assert "huggingface-cli download" in message and "HF_HOME" in message and "source: file" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_hub_unreachable_without_offline_flag_fails_fast(tmp_path, monkeypatch):
    """Network down but HF_HUB_OFFLINE unset: one short probe, then the cache, then a clear error."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import httpx as hub_httpx

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(self, repo_id, **kwargs):
        probes.append(kwargs.get("timeout"))
        raise hub_httpx.ConnectError("simulated: network is unreachable")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="cannot be reached.*ConnectError"):
        prepare("g", {"source": "hub", "id": "someone/tiny"}, tmp_path / "out")
    assert time.monotonic() - started < 5
    assert probes == [ds.HUB_TIMEOUT_S]


def make_hub_cache(hf_home: Path, repo_id: str, config: str, split: str, table, commit: str) -> None:
    """Lay out a data set in the hub cache exactly as `hf download --repo-type dataset` does."""
    import pyarrow.parquet as pq

    repo_folder = hf_home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    (snapshot / config).mkdir(parents=True)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    pq.write_table(table, snapshot / config / f"{split}-00000-of-00001.parquet")
    (snapshot / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: {split}\n"
        f"    path: {config}/{split}-*\n---\n# test data set\n"
    )


def test_hub_alias_loads_offline_from_local_cache(tmp_path):
    import pyarrow as pa

    commit = "0123456789abcdef0123456789abcdef01234567"
    questions = [f"Question number {i}: how many apples?" for i in range(6)]
    make_hub_cache(
        tmp_path / "hf_home",
        "openai/gsm8k",
        "main",
        "test",
        pa.table({"question": questions, "answer": ["#### 1"] * 6}),
        commit,
    )
    started = time.monotonic()
    manifest = prepare(
        "g", {"source": "hub", "id": "gsm8k", "sample_size": 4, "shuffle": True, "seed": 3}, tmp_path / "out"
    )
    assert time.monotonic() - started < 30
    lines = read_lines(tmp_path / "out" / "prompts.jsonl")
    assert len(lines) == 4 and {line["prompt"] for line in lines} <= set(questions)
    assert all(line["source_id"].startswith("openai/gsm8k:test:") for line in lines)
    assert manifest["hub_revision"] == commit
    assert manifest["spec"]["repo_id"] == "openai/gsm8k" and manifest["spec"]["config_name"] == "main"
    assert manifest["source_sha256"] is None
    with pytest.raises(ConfigError, match=r"datasets\.g\.split"):
        prepare("g", {"source": "hub", "id": "gsm8k", "split": "train"}, tmp_path / "bad")


def test_hub_repo_id_with_category_alias_offline(tmp_path):
    import pyarrow as pa

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    table = pa.table(
        {
            "question": ["q1", "q2", "q3"],
            "subject": ["anatomy", "law", "law"],
            "choices": [["a", "b"]] * 3,
            "answer": [0, 1, 0],
        }
    )
    make_hub_cache(tmp_path / "hf_home", "cais/mmlu", "all", "test", table, commit)
    manifest = prepare("m", {"source": "hub", "id": "mmlu"}, tmp_path / "out")
    assert manifest["categories"] == {"anatomy": 1, "law": 2}
    assert manifest["hub_revision"] == commit


# ---------------------------------------------------------------------------------------------
# Reading back


def test_load_prompts_checks_the_manifest_hash(tmp_path):
    prepare("b", {"source": "bundled", "categories": ["math"]}, tmp_path)
    prompts = ds.load_prompts(tmp_path)
    assert len(prompts) == 18 and prompts[0]["index"] == 0 and prompts[0]["category"] == "math"
    assert set(prompts[0]) == {"index", "prompt", "source_id", "category"}
    path = tmp_path / "prompts.jsonl"
    path.write_text(path.read_text().replace("17 times 23", "17 times 24"))
    with pytest.raises(ArtifactError, match="changed after it was prepared"):
        ds.load_prompts(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        ds.load_prompts(tmp_path / "nowhere")


def test_default_provenance_records_the_source_file(tmp_path):
    ds.prepare_dataset("b", {"source": "bundled", "categories": ["code"]}, tmp_path)
    document = read_json_artifact(tmp_path / "manifest.json", "dataset_manifest")
    assert str(ds.BUNDLED_PROMPTS_PATH) in document["provenance"]["inputs"]
    assert document["provenance"]["inputs"][str(ds.BUNDLED_PROMPTS_PATH)] == document["data"]["source_sha256"]
