"""Synthetic prompts of exact token lengths drawn from a distribution, built with a real tokenizer."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llm_energy.config_schema import validate_section
from llm_energy.datasets.records import LoadedSource, PromptRecord, _key
from llm_energy.datasets.sources import BUNDLED_PROMPTS_PATH
from llm_energy.errors import ConfigError

TOKEN_LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
INPUT_TOKENS_SCHEMA = "#/$defs/input_tokens"


def _uniform_int(rng: random.Random, low: int, high: int) -> int:
    # Only Random.random() is guaranteed to give the same stream on every Python version, so
    # integers and distributions are derived from it (inverse transform) rather than from
    # randint/gauss or numpy, whose algorithms may change between releases.
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def draw_token_lengths(input_tokens: Mapping[str, Any], count: int, rng: random.Random, key: str) -> list[int]:
    """Draw `count` prompt lengths (tokens, >= 1) from the `input_tokens` distribution, the mapping
    at config key `key` (its shape is the config schema's `$defs/input_tokens`, checked here):

    - fixed: `value`;
    - uniform: integers in [`min`, `max`], both included;
    - normal: `mean`, `std`, truncated to [`min`, `max`] and rounded;
    - lognormal: `mean` is the mean token count (not the mean of the log), `sigma` the standard
      deviation of the log, truncated to [`min`, `max`] and rounded.
    Truncation is exact (inverse CDF over the truncated range), not clipping: no spikes at the bounds.
    `min` defaults to 1 and `max` to no limit for normal and lognormal.
    """
    values = validate_section(INPUT_TOKENS_SCHEMA, input_tokens, prefix=tuple(key.split(".")))
    distribution = values["distribution"]
    if distribution == "fixed":
        return [values["value"]] * count
    low, high = values.get("min", 1), values.get("max")
    if high is not None and high < low:
        raise ConfigError(f"{key}.max", f"max ({high}) is below min ({low})", "swap or fix the bounds")
    if distribution == "uniform":
        return [_uniform_int(rng, low, high) for _ in range(count)]

    spread = float(values["std" if distribution == "normal" else "sigma"])
    mean = float(values["mean"])
    if spread == 0:  # degenerate: every prompt gets the mean, kept inside the bounds
        return [min(max(round(mean), low), high if high is not None else round(mean))] * count
    if distribution == "normal":
        normal = statistics.NormalDist(mean, spread)
        to_length: Callable[[float], float] = lambda x: x  # noqa: E731
        from_length: Callable[[float], float] = lambda x: x  # noqa: E731
    else:
        # E[X] = exp(mu + sigma^2 / 2) for a lognormal X, so mu follows from the wanted mean.
        normal = statistics.NormalDist(math.log(mean) - spread**2 / 2, spread)
        to_length = math.exp
        from_length = lambda x: math.log(x) if x > 0 else -math.inf  # noqa: E731

    def cdf(x: float) -> float:
        z = from_length(x)
        return 0.0 if z == -math.inf else normal.cdf(z)

    # Continuous values in [low - 0.5, high + 0.5) round to integers in [low, high].
    lo_p = cdf(low - 0.5)
    hi_p = 1.0 if high is None else cdf(high + 0.5)
    lengths = []
    for _ in range(count):
        p = lo_p + rng.random() * (hi_p - lo_p)
        p = min(max(p, 1e-12), 1 - 1e-12)  # inv_cdf is undefined at 0 and 1
        length = round(to_length(normal.inv_cdf(p)))
        lengths.append(min(max(length, low), high if high is not None else length))
    return lengths


class ExactLengthPromptBuilder:
    """Builds text whose token count with one tokenizer is exactly a target.

    Text comes from a corpus of words (the bundled prompts), read from a start position: the longest
    word prefix that does not exceed the target is found by bisection, then the missing tokens are
    added by cutting the token ids of one more word to the target and decoding, or, when the tokenizer
    merges differently after decoding, by appending short pieces that each add one token. Every
    candidate is re-encoded and checked, so the result is exact for any tokenizer.
    """

    FILLER_PIECES = (
        " the",
        " a",
        " and",
        ".",
        ",",
        " of",
        " to",
        " is",
        " in",
        " it",
        "!",
        "?",
        " x",
        " I",
        "a",
        "e",
        " ",
    )

    def __init__(self, tokenizer: Any, words: Sequence[str]):
        if not words:
            raise ValueError("the word corpus is empty")
        self.tokenizer = tokenizer
        self.words = list(words)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _text(self, start: int, n_words: int) -> str:
        size = len(self.words)
        return " ".join(self.words[(start + i) % size] for i in range(n_words))

    def build(self, target: int, start: int) -> str | None:
        """Text of exactly `target` tokens starting at word `start`, or None if none was found."""
        # 1. Grow the window until it reaches the target (doubling keeps the encodes few).
        n_words = max(1, target)
        while self.count(self._text(start, n_words)) < target:
            n_words *= 2
        if self.count(self._text(start, n_words)) == target:
            return self._text(start, n_words)
        # 2. Bisect: count(prefix(low)) <= target < count(prefix(high)).
        low, high = 0, n_words
        while high - low > 1:
            middle = (low + high) // 2
            if self.count(self._text(start, middle)) <= target:
                low = middle
            else:
                high = middle
        base = self._text(start, low)
        base_count = self.count(base) if low else 0
        if base_count == target:
            return base
        # 3. Cut the next word's tokens: natural text in the common case.
        ids = self.tokenizer.encode(self._text(start, high), add_special_tokens=False)[:target]
        cut = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if "\ufffd" not in cut and self.count(cut) == target:
            return cut
        # 4. Top up one token at a time with pieces verified to add exactly one token.
        text, current = base, base_count
        while current < target:
            for piece in self.FILLER_PIECES:
                if self.count(text + piece) == current + 1:
                    text, current = text + piece, current + 1
                    break
            else:
                return None
        return text


def bundled_words() -> list[str]:
    words: list[str] = []
    for line in BUNDLED_PROMPTS_PATH.read_text(encoding="utf-8").splitlines():
        if line.strip():
            words.extend(json.loads(line)["prompt"].split())
    return words


def _load_synthetic(name: str, spec: Mapping[str, Any], tokenizer: Any) -> LoadedSource:
    key = _key(name, "input_tokens")
    if tokenizer is None:
        raise ConfigError(
            key,
            "a synthetic data set needs a tokenizer to build prompts of exact token lengths, "
            "but prepare_dataset got no tokenizer_dir",
            "pass the tokenizer (folder of the model the prompts are meant for) as tokenizer_dir",
        )
    count = spec["count"]
    rng = random.Random(int(spec["seed"]))
    lengths = draw_token_lengths(spec["input_tokens"], count, rng, key)
    builder = ExactLengthPromptBuilder(tokenizer, bundled_words())
    records = []
    from tqdm import tqdm

    for i, target in enumerate(tqdm(lengths, desc=f"synthetic prompts ({name})", mininterval=5, disable=count < 50)):
        start = _uniform_int(rng, 0, len(builder.words) - 1)
        text = builder.build(target, start)
        if text is None:
            raise ConfigError(
                key,
                f"cannot build a prompt of exactly {target} tokens with the tokenizer "
                f"'{getattr(tokenizer, 'name_or_path', tokenizer)}'",
                "use other lengths (e.g. a larger min) or another tokenizer",
            )
        records.append(PromptRecord(prompt=text, source_id=f"synthetic-{i:06d}", target_tokens=target))
    return LoadedSource(records=records)
