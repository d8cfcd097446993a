"""Builtin models: a random-weight Llama- or GPT-2-style model and a BPE tokenizer trained on the bundled
prompts, built from a seed and a few dimensions (same seed and dims => byte-identical files)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from llm_energy.artifacts import sha256_file
from llm_energy.errors import ArtifactError, ConfigError
from llm_energy.models.specs import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, BuiltinSpec

log = logging.getLogger(__name__)


PACKAGE_DIR = Path(__file__).resolve().parent.parent
BUNDLED_PROMPTS = PACKAGE_DIR / "data" / "bundled_prompts.jsonl"


def read_prompt_corpus(path: Path = BUNDLED_PROMPTS) -> list[str]:
    """The 'prompt' field of each JSON line of `path` (the tokenizer's training text)."""
    if not path.is_file():
        raise ArtifactError(
            f"{path}: the bundled prompt file is missing; reinstall llm_energy (it ships in llm_energy/data)"
        )
    prompts: list[str] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}:{line_no}: expected a JSON object with a 'prompt' ({exc})") from None
        if isinstance(prompt, str) and prompt:
            prompts.append(prompt)
    if not prompts:
        raise ArtifactError(f"{path}: no prompts to train the builtin tokenizer on")
    return prompts


def train_tokenizer(corpus: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """A byte-level BPE trained on `corpus`, wrapped for transformers (left padding, BOS prepended).

    Byte-level means every text is encodable (no unknown tokens); the vocabulary may end up smaller
    than `vocab_size` when the corpus runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama-style: every sequence starts with BOS, so prompts look the same in every backend.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",  # decoder-only batches generate from the right edge
        model_max_length=model_max_length,  # lets callers truncate to what the model can take
    )


def builtin_model_config(spec: BuiltinSpec, vocab_size: int, special_ids: Mapping[str, int]):
    """The transformers config of a builtin model (vocab_size already resolved)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(pad_token_id=special_ids["pad"], bos_token_id=special_ids["bos"], eos_token_id=special_ids["eos"])
    if spec.architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=bool(spec.tie_word_embeddings),
            **ids,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_position_embeddings,
            tie_word_embeddings=spec.tie_word_embeddings is not False,
            **ids,
        )
    config.architectures = ["LlamaForCausalLM" if spec.architecture == "llama" else "GPT2LMHeadModel"]
    return config


def build_builtin_model(spec: BuiltinSpec, weights_dir: Path, corpus_path: Path = BUNDLED_PROMPTS) -> dict:
    """Train the tokenizer, initialise random weights from the seed and save both to `weights_dir`.

    Returns facts about the tokenizer for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    corpus = read_prompt_corpus(corpus_path)
    tokenizer = train_tokenizer(corpus, spec.tokenizer_vocab_size, spec.max_position_embeddings)
    tokenizer_size = len(tokenizer)
    vocab_size = spec.vocab_size if spec.vocab_size is not None else tokenizer_size
    if vocab_size < tokenizer_size:
        raise ConfigError(
            "vocab_size",
            f"{vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens",
            "Leave vocab_size out (it defaults to the tokenizer size) or raise it.",
        )
    special_ids = {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }
    config = builtin_model_config(spec, vocab_size, special_ids)

    log.info(
        "building builtin %s: hidden %d, %d layers, %d heads, vocab %d, seed %d",
        spec.architecture,
        spec.hidden_size,
        spec.num_layers,
        spec.num_heads,
        vocab_size,
        spec.seed,
    )
    # fork_rng: seeding must not leak into the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        # Random init needs real memory (a meta tensor has no values): float32 on CPU, then cast.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if spec.save_dtype != "float32":
        model = model.to(getattr(torch, spec.save_dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
    )
    weights_dir.mkdir(parents=True, exist_ok=True)
    # One shard: the safetensors header then lists every tensor, and the hash covers the whole model.
    model.save_pretrained(weights_dir, safe_serialization=True, max_shard_size="1000GB")
    tokenizer.save_pretrained(weights_dir)
    del model
    return {
        "kind": "trained_byte_level_bpe",
        "corpus": str(corpus_path.relative_to(PACKAGE_DIR.parent))
        if corpus_path.is_relative_to(PACKAGE_DIR.parent)
        else str(corpus_path),
        "corpus_sha256": sha256_file(corpus_path),
        "corpus_prompts": len(corpus),
        "vocab_size_tokens": tokenizer_size,
        "special_token_ids": special_ids,
    }
