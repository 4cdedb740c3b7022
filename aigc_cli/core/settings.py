"""Decoding settings: one frozen object, validated up front with flag-named messages; no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aigc_cli.core.errors import UsageError


class Decoding(str, Enum):
    sample = "sample"
    greedy = "greedy"
    beam = "beam"
    contrastive = "contrastive"


@dataclass(frozen=True)
class Mode:
    """What a decoding mode asks of the engine, in one place."""

    runs_on: str  # "scheduler" (continuous batching), "static" (static batches) or "beam" (one request at a time)
    one_answer: str | None  # why -n must be 1, or None
    kv_rows: str | None  # the setting that multiplies a sequence's KV cache (beams, branches), or None
    default_top_k: int | None = None


MODES = {
    Decoding.sample: Mode("scheduler", None, None, default_top_k=50),
    Decoding.greedy: Mode("scheduler", "greedy decoding has one answer per prompt", None),
    Decoding.beam: Mode("beam", None, "num_beams"),
    Decoding.contrastive: Mode("scheduler", "contrastive search is deterministic", "top_k", default_top_k=4),
}
DEFAULT_TOP_K = {d: m.default_top_k for d, m in MODES.items() if m.default_top_k is not None}
DEFAULT_NUM_BEAMS = 4
# Upper bounds that no real use reaches and that keep a typo from exhausting memory; the engine
# also checks what the model allows (context, vocabulary, the KV cache of beams and branches).
MAX_BEAMS = 64
MAX_CONTRASTIVE_K = 64
MAX_SEQUENCES = 10_000
MAX_BATCH = 1024


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what is generated for one prompt (the model aside)."""

    max_new_tokens: int = 50
    min_new_tokens: int = 0
    decoding: Decoding = Decoding.sample
    num_sequences: int = 1
    temperature: float = 1.0
    top_k: int | None = None  # None: 50 for sample, 4 for contrastive
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float | None = None
    num_beams: int | None = None  # None: max(4, -n) for beam
    length_penalty: float = 1.0
    early_stopping: bool = False
    penalty_alpha: float = 0.6
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    ban: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # end the sequence at these tokens (not kept)

    def resolved(self) -> GenerationSettings:
        """Validate and fill mode-dependent defaults; raises UsageError naming the flag."""
        s = self
        for flag, value in (
            ("temperature", s.temperature),
            ("top_p", s.top_p),
            ("typical_p", s.typical_p),
            ("min_p", s.min_p if s.min_p is not None else 0.0),
            ("length_penalty", s.length_penalty),
            ("penalty_alpha", s.penalty_alpha),
            ("repetition_penalty", s.repetition_penalty),
        ):
            _check(math.isfinite(value), flag, f"must be a finite number (got {value})")
        _check(s.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1 (got {s.max_new_tokens})")
        _check(s.min_new_tokens >= 0, "min_new_tokens", f"must be 0 or more (got {s.min_new_tokens})")
        _check(
            s.min_new_tokens <= s.max_new_tokens,
            "min_new_tokens",
            f"({s.min_new_tokens}) must not exceed --max-new-tokens ({s.max_new_tokens})",
        )
        _check(
            1 <= s.num_sequences <= MAX_SEQUENCES, "num_sequences", f"must be from 1 to {MAX_SEQUENCES} (got {s.num_sequences})"
        )
        _check(s.temperature >= 0, "temperature", f"must be 0 or more (got {s.temperature}); 0 means greedy")
        _check(0 < s.top_p <= 1, "top_p", f"must be in (0, 1] (got {s.top_p})")
        _check(0 < s.typical_p <= 1, "typical_p", f"must be in (0, 1] (got {s.typical_p})")
        if s.min_p is not None:
            _check(0 <= s.min_p <= 1, "min_p", f"must be in [0, 1] (got {s.min_p})")
        if s.top_k is not None:
            _check(s.top_k >= 0, "top_k", f"must be 0 (no limit) or more (got {s.top_k})")
        _check(s.repetition_penalty > 0, "repetition_penalty", f"must be positive (got {s.repetition_penalty})")
        _check(s.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", f"must be 0 or more (got {s.no_repeat_ngram_size})")
        _check(0 <= s.penalty_alpha <= 1, "penalty_alpha", f"must be in [0, 1] (got {s.penalty_alpha})")
        for text in s.stop:
            _check(text != "", "stop", "must not be empty")
        for word in s.ban:
            _check(word.strip() != "", "ban", "must not be empty")
        for token in s.stop_token_ids:
            _check(isinstance(token, int) and token >= 0, "stop_token_ids", f"must be token ids, 0 or more (got {token!r})")
        if s.seed is not None:
            _check(0 <= s.seed < 2**63, "seed", f"must be in [0, 2^63) (got {s.seed})")

        try:
            decoding = Decoding(s.decoding)  # library callers may pass "beam" as a string
        except ValueError:
            raise SettingsError("decoding", f"must be one of {', '.join(d.value for d in Decoding)} (got {s.decoding!r})") from None
        if decoding is Decoding.sample and s.temperature == 0:
            _check(
                s.num_sequences == 1,
                "temperature",
                f"0 means greedy decoding, which has one answer: use -n 1 (got -n {s.num_sequences}) or a temperature above 0",
            )
            decoding = Decoding.greedy
        reason = MODES[decoding].one_answer
        if reason is not None:
            _check(
                s.num_sequences == 1,
                "num_sequences",
                f"{reason}: use -n 1 (got {s.num_sequences}) or --decoding sample/beam",
            )
        num_beams = s.num_beams
        if decoding is Decoding.beam:
            num_beams = num_beams if num_beams is not None else max(DEFAULT_NUM_BEAMS, s.num_sequences)
            _check(2 <= num_beams <= MAX_BEAMS, "num_beams", f"must be from 2 to {MAX_BEAMS} for beam search (got {num_beams})")
            _check(
                s.num_sequences <= num_beams,
                "num_sequences",
                f"({s.num_sequences}) must not exceed --num-beams ({num_beams})",
            )
            _check(not s.stop_token_ids, "stop_token_ids", "not used by beam search")
        elif s.num_beams is not None:
            raise SettingsError("num_beams", f"only used with --decoding beam (got --decoding {decoding.value})")
        top_k = s.top_k if s.top_k is not None else MODES[decoding].default_top_k
        if decoding is Decoding.contrastive:
            _check(
                top_k is not None and 1 <= top_k <= MAX_CONTRASTIVE_K,
                "top_k",
                f"must be from 1 to {MAX_CONTRASTIVE_K} for contrastive search (got {top_k})",
            )
        return dataclasses.replace(s, decoding=decoding, num_beams=num_beams, top_k=top_k)

    @property
    def k(self) -> int:
        """top_k of resolved sampling or contrastive settings (0: no limit, for sampling)."""
        if self.top_k is None:
            raise ValueError(f"top_k is not set for {self.decoding.value} decoding (resolve the settings first)")
        return self.top_k

    @property
    def beams(self) -> int:
        """num_beams of resolved beam-search settings."""
        if self.num_beams is None:
            raise ValueError(f"num_beams is not set for {self.decoding.value} decoding (resolve the settings first)")
        return self.num_beams

    @property
    def mode(self) -> Mode:
        return MODES[Decoding(self.decoding)]

    def kv_rows(self) -> int:
        """KV-cache rows one sequence needs (beam search: its beams; contrastive search: its branches)."""
        name = self.mode.kv_rows
        return int(getattr(self, name) or 1) if name else 1

    def with_overrides(self, **overrides: Any) -> GenerationSettings:
        """Per-record overrides (batch files), re-validated."""
        return dataclasses.replace(self, **overrides).resolved()

    def as_record(self) -> dict[str, Any]:
        """The settings as they are written into JSONL provenance; `seed` is the run's seed."""
        d = dataclasses.asdict(self)
        d["decoding"] = self.decoding.value
        d["stop"] = list(self.stop)
        d["ban"] = list(self.ban)
        if self.stop_token_ids:  # absent when unused, so that older records keep their fingerprints
            d["stop_token_ids"] = list(self.stop_token_ids)
        else:
            del d["stop_token_ids"]
        return d


# How the CLI names each setting; other front ends name `SettingsError.field` their own way (a
# JSONL key in an error record, a request parameter in an HTTP 400).
FLAGS = {
    "num_sequences": "-n/--num-sequences",
    **{name: "--" + name.replace("_", "-") for name in (
        "max_new_tokens", "min_new_tokens", "decoding", "temperature", "top_k", "top_p", "typical_p", "min_p",
        "num_beams", "length_penalty", "penalty_alpha", "repetition_penalty", "no_repeat_ngram_size", "stop", "ban", "seed",
        "stop_token_ids",
    )},
}


class SettingsError(UsageError):
    """A setting that cannot be used, keyed by its GenerationSettings field; the message names the CLI flag."""

    def __init__(self, field: str, text: str) -> None:
        super().__init__(f"{FLAGS.get(field, field)}: {text}")
        self.field, self.text = field, text


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise SettingsError(field, message)
