"""Decoding settings: one frozen object, validated up front with flag-named messages; no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aigc_cli.errors import UsageError


class Decoding(str, Enum):
    sample = "sample"
    greedy = "greedy"
    beam = "beam"
    contrastive = "contrastive"


DEFAULT_TOP_K = {Decoding.sample: 50, Decoding.contrastive: 4}
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

    def resolved(self) -> GenerationSettings:
        """Validate and fill mode-dependent defaults; raises UsageError naming the flag."""
        s = self
        for flag, value in (
            ("--temperature", s.temperature),
            ("--top-p", s.top_p),
            ("--typical-p", s.typical_p),
            ("--min-p", s.min_p if s.min_p is not None else 0.0),
            ("--length-penalty", s.length_penalty),
            ("--penalty-alpha", s.penalty_alpha),
            ("--repetition-penalty", s.repetition_penalty),
        ):
            _check(math.isfinite(value), flag, f"must be a finite number (got {value})")
        _check(s.max_new_tokens >= 1, "--max-new-tokens", f"must be at least 1 (got {s.max_new_tokens})")
        _check(s.min_new_tokens >= 0, "--min-new-tokens", f"must be 0 or more (got {s.min_new_tokens})")
        _check(
            s.min_new_tokens <= s.max_new_tokens,
            "--min-new-tokens",
            f"({s.min_new_tokens}) must not exceed --max-new-tokens ({s.max_new_tokens})",
        )
        _check(
            1 <= s.num_sequences <= MAX_SEQUENCES, "-n/--num-sequences", f"must be from 1 to {MAX_SEQUENCES} (got {s.num_sequences})"
        )
        _check(s.temperature >= 0, "--temperature", f"must be 0 or more (got {s.temperature}); 0 means greedy")
        _check(0 < s.top_p <= 1, "--top-p", f"must be in (0, 1] (got {s.top_p})")
        _check(0 < s.typical_p <= 1, "--typical-p", f"must be in (0, 1] (got {s.typical_p})")
        if s.min_p is not None:
            _check(0 <= s.min_p <= 1, "--min-p", f"must be in [0, 1] (got {s.min_p})")
        if s.top_k is not None:
            _check(s.top_k >= 0, "--top-k", f"must be 0 (no limit) or more (got {s.top_k})")
        _check(s.repetition_penalty > 0, "--repetition-penalty", f"must be positive (got {s.repetition_penalty})")
        _check(s.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size", f"must be 0 or more (got {s.no_repeat_ngram_size})")
        _check(0 <= s.penalty_alpha <= 1, "--penalty-alpha", f"must be in [0, 1] (got {s.penalty_alpha})")
        for text in s.stop:
            _check(text != "", "--stop", "must not be empty")
        for word in s.ban:
            _check(word.strip() != "", "--ban", "must not be empty")
        if s.seed is not None:
            _check(0 <= s.seed < 2**63, "--seed", f"must be in [0, 2^63) (got {s.seed})")

        try:
            decoding = Decoding(s.decoding)  # library callers may pass "beam" as a string
        except ValueError:
            raise UsageError(f"--decoding: must be one of {', '.join(d.value for d in Decoding)} (got {s.decoding!r})") from None
        if decoding is Decoding.sample and s.temperature == 0:
            _check(
                s.num_sequences == 1,
                "--temperature",
                f"0 means greedy decoding, which has one answer: use -n 1 (got -n {s.num_sequences}) or a temperature above 0",
            )
            decoding = Decoding.greedy
        if decoding is Decoding.greedy:
            _check(
                s.num_sequences == 1,
                "-n/--num-sequences",
                f"greedy decoding has one answer per prompt: use -n 1 (got {s.num_sequences}) or --decoding sample/beam",
            )
        if decoding is Decoding.contrastive:
            _check(
                s.num_sequences == 1,
                "-n/--num-sequences",
                f"contrastive search is deterministic: use -n 1 (got {s.num_sequences})",
            )
        num_beams = s.num_beams
        if decoding is Decoding.beam:
            num_beams = num_beams if num_beams is not None else max(DEFAULT_NUM_BEAMS, s.num_sequences)
            _check(2 <= num_beams <= MAX_BEAMS, "--num-beams", f"must be from 2 to {MAX_BEAMS} for beam search (got {num_beams})")
            _check(
                s.num_sequences <= num_beams,
                "-n/--num-sequences",
                f"({s.num_sequences}) must not exceed --num-beams ({num_beams})",
            )
        elif s.num_beams is not None:
            raise UsageError(f"--num-beams: only used with --decoding beam (got --decoding {decoding.value})")
        top_k = s.top_k if s.top_k is not None else DEFAULT_TOP_K.get(decoding)
        if decoding is Decoding.contrastive:
            _check(
                1 <= top_k <= MAX_CONTRASTIVE_K,
                "--top-k",
                f"must be from 1 to {MAX_CONTRASTIVE_K} for contrastive search (got {top_k})",
            )
        return dataclasses.replace(s, decoding=decoding, num_beams=num_beams, top_k=top_k)

    def with_overrides(self, **overrides: Any) -> GenerationSettings:
        """Per-record overrides (batch files), re-validated."""
        return dataclasses.replace(self, **overrides).resolved()

    def as_record(self) -> dict[str, Any]:
        """The settings as they are written into JSONL provenance; `seed` is the run's seed."""
        d = dataclasses.asdict(self)
        d["decoding"] = self.decoding.value
        d["stop"] = list(self.stop)
        d["ban"] = list(self.ban)
        return d


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{flag}: {message}")
