"""Generation settings, declared once: the registry gives each setting its type, bounds, default,
help, CLI flag, request parameter and JSONL key, and every front end derives its own surface from
it (the CLI's options, the server's request schema, the JSONL overrides); `GenerationSettings` is
the frozen object they all build, validated here; no torch.

Where a protocol differs on purpose, the difference is declared here too (`Setting.api_default`,
`SURFACE_DIFFERENCES`), so that the three surfaces agree everywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aigc_cli.core.errors import UsageError, name_settings_with, ref
from aigc_cli.core.textrules import unescape


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
DEFAULT_NUM_BEAMS = 4
# Upper bounds that no real use reaches and that keep a typo from exhausting memory; the engine
# also checks what the model allows (context, vocabulary, the KV cache of beams and branches).
MAX_BEAMS = 64
MAX_CONTRASTIVE_K = 64
MAX_SEQUENCES = 10_000
MAX_BATCH = 1024
MAX_STOPS, MAX_STOP_CHARS = 16, 1_000  # stop strings: how many, and characters in each
MAX_BANS, MAX_BAN_CHARS = 256, 100
MAX_STOP_IDS = 256
SEED_LIMIT = 2**63

SURFACES = ("cli", "api", "jsonl")


@dataclass(frozen=True)
class Setting:
    """One generation setting on every surface.

    `kind`: "int", "float", "bool", "choice" (a Decoding), "texts" (a list of strings) or "ids" (a
    list of token ids). Bounds are inclusive unless `*_open`. `optional`: None is allowed (a
    default that depends on the decoding mode). `flag`, `param`, `key`: the setting's name on the
    command line, in an API request, in a JSONL record (None: not on that surface)."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    flag: str | None = None
    short: str | None = None
    param: str | None = None
    key: str | None = None
    api_default: Any = None  # the API's own default, where it differs on purpose (with has_api_default)
    has_api_default: bool = False
    note: str = ""  # said after a bound's message ("0 means greedy")
    max_items: int | None = None  # texts and ids
    max_chars: int | None = None  # characters per text
    metavar: str | None = None
    cli_convert: Callable[[Any], Any] | None = None  # the CLI's reading of a typed value (--stop escapes)

    def label(self, surface: str) -> str:
        """How `surface` names this setting in messages."""
        if surface == "cli":
            return f"{self.short}/{self.flag}" if self.short and self.flag else self.flag or self.name
        if surface == "api":
            return f"'{self.param or self.name}'"
        return f"'{self.key or self.name}'"

    def default_for(self, surface: str) -> Any:
        if surface == "api" and self.has_api_default:
            return self.api_default
        return self.default

    def bounds_text(self) -> str:
        """The bound in words: "must be in (0, 1]", "must be from 1 to 64", "must be 0 or more"."""
        lo, hi = _num(self.low), _num(self.high)
        if self.low is not None and self.high is not None:
            if self.kind == "int":
                return f"must be at least {lo} and below {hi}" if self.high_open else f"must be from {lo} to {hi}"
            return f"must be in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if self.low is not None:
            if self.low_open:
                return "must be positive" if self.low == 0 else f"must be above {lo}"
            return "must be 0 or more" if self.low == 0 else f"must be at least {lo}"
        if self.high is not None:
            return f"must be below {hi}" if self.high_open else f"must be at most {hi}"
        return "must be a finite number"

    def within(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if x == SEED_LIMIT:
        return "2^63"
    return str(int(x)) if float(x).is_integer() else str(x)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting(name: str, kind: str, default: Any, help: str, **kw: Any) -> Setting:
    """A setting on all three surfaces, named after its field unless told otherwise."""
    kw.setdefault("flag", _flag(name))
    kw.setdefault("param", name)
    kw.setdefault("key", name)
    return Setting(name, kind, default, help, **kw)


REGISTRY: tuple[Setting, ...] = (
    _setting("num_sequences", "int", 1, "Sequences per prompt.", low=1, high=MAX_SEQUENCES, short="-n", param="n", key="n"),
    _setting("max_new_tokens", "int", 50, "New tokens at most (the prompt is not counted).", low=1, param="max_tokens", api_default=16, has_api_default=True),
    _setting("min_new_tokens", "int", 0, "New tokens at least before EOS may end a sequence.", low=0, param="min_tokens"),
    _setting("decoding", "choice", Decoding.sample, "sample, greedy, beam or contrastive."),
    _setting("temperature", "float", 1.0, "Sampling temperature; 0 means greedy.", low=0, note="0 means greedy"),
    _setting(
        "top_k", "int", None, "Keep the k most likely tokens (sample: default 50, 0 = off; contrastive: default 4).",
        low=0, optional=True, note="0 means no limit",
    ),
    _setting("top_p", "float", 1.0, "Nucleus sampling: keep the smallest set with this much probability.", low=0, low_open=True, high=1),
    _setting("typical_p", "float", 1.0, "Locally typical sampling mass (1 = off).", low=0, low_open=True, high=1),
    _setting("min_p", "float", None, "Drop tokens below min-p times the top probability.", low=0, high=1, optional=True),
    _setting("num_beams", "int", None, "Beams for --decoding beam (default max(4, -n)).", low=2, high=MAX_BEAMS, optional=True),
    _setting("length_penalty", "float", 1.0, "Beam search: >1 favours longer sequences."),
    _setting("early_stopping", "bool", False, "Beam search: stop once -n beams are finished."),
    _setting("penalty_alpha", "float", 0.6, "Contrastive search degeneration penalty (0 = greedy).", low=0, high=1),
    _setting("repetition_penalty", "float", 1.0, "Penalise tokens already present (1 = off).", low=0, low_open=True),
    _setting("no_repeat_ngram_size", "int", 0, "Never repeat an n-gram of this size (0 = off).", low=0),
    _setting(
        "stop", "texts", (), "End the output before this text (repeatable); \\n, \\t, \\r, \\\\, \\xHH and \\uHHHH are read as escapes.",
        max_items=MAX_STOPS, max_chars=MAX_STOP_CHARS, metavar="TEXT", cli_convert=unescape,
    ),
    _setting("ban", "texts", (), "Never generate this word, any case (repeatable).", max_items=MAX_BANS, max_chars=MAX_BAN_CHARS, metavar="WORD"),
    _setting("seed", "int", None, "Random seed; the same seed and settings give the same output.", low=0, high=SEED_LIMIT, high_open=True, optional=True),
    _setting(
        "stop_token_ids", "ids", (), "End the sequence at this token id (repeatable; the token is not kept).",
        flag="--stop-token-id", max_items=MAX_STOP_IDS, metavar="ID",
    ),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in REGISTRY}
BY_PARAM: dict[str, Setting] = {s.param: s for s in REGISTRY if s.param}
BY_KEY: dict[str, Setting] = {s.key: s for s in REGISTRY if s.key}

# Where the surfaces differ on purpose; the table-driven test in tests/test_settings.py allows these
# differences and no others.
SURFACE_DIFFERENCES = {
    "max_new_tokens": "api: max_tokens defaults to 16, as in the OpenAI API, and may be 0 with echo (score the prompt only)",
    "top_k": "api: sampling has no top-k unless asked (OpenAI has none; vLLM's -1 also means none); the CLI and JSONL default to 50",
    "decoding": "api: without 'decoding', num_beams above 1 selects beam search",
    "num_beams": "api: num_beams above 1 without 'decoding' selects beam search (the CLI and JSONL refuse beams with sampling)",
    "num_sequences": "api: best_of sequences are generated and the n best returned",
    "stop": "cli: --stop reads backslash escapes (\\n, \\t, ...); the API and JSONL take JSON strings as they are",
}

# How the CLI names each setting (kept for callers that name flags directly).
FLAGS = {s.name: s.label("cli") for s in REGISTRY}


def _named(name: str, surface: str) -> str | None:
    setting = SETTINGS.get(name)
    return setting.label(surface) if setting is not None else None


name_settings_with(_named)


class SettingsError(UsageError):
    """A setting that cannot be used, keyed by its GenerationSettings field; `render(surface)`
    names it (and the settings its text refers to) as that surface does."""

    def __init__(self, field: str, text: str) -> None:
        super().__init__(f"{ref(field)}: {text}")
        self.field = field

    @property
    def reason(self) -> str:
        """The message without the setting's own name, rendered for the command line."""
        return self.message.split(": ", 1)[1]

    def reason_for(self, surface: str) -> str:
        return self.render(surface).split(": ", 1)[1]


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise SettingsError(field, message)


def shown(value: Any, limit: int = 40) -> str:
    """A value quoted in a message, cut short (a 400-digit number, a 1 MB string)."""
    text = repr(value.value if isinstance(value, Enum) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading values from outside ------------------------------------------------------------------


def text_problem(value: str) -> str | None:
    """Why `value` is not valid Unicode text, or None: a lone surrogate (from JSON's \\ud800
    escapes) cannot be encoded or tokenized, and a byte that was not UTF-8 on the command line
    arrives as one (Python's surrogateescape)."""
    bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
    if bad is None:
        return None
    code = ord(value[bad])
    if 0xDC80 <= code <= 0xDCFF:
        return f"not valid UTF-8 (byte 0x{code - 0xDC00:02X} at character {bad + 1})"
    return f"not valid Unicode (a lone surrogate U+{code:04X} at character {bad + 1})"


def check_text(value: str, what: str) -> None:
    """UsageError naming `what` when `value` is not valid Unicode text (see `text_problem`)."""
    problem = text_problem(value)
    if problem is not None:
        raise UsageError(f"{what}: {problem}")


def coerce(setting: Setting, value: Any) -> Any:
    """A value from JSON (a request body or a JSONL record) as the setting's type; SettingsError
    for the wrong type, a number that is not finite or not representable, or text that is not
    Unicode. Bounds are checked by `GenerationSettings.resolved`, for every surface alike."""
    s, kind = setting, setting.kind
    if value is None and (s.optional or kind in ("texts", "ids")):
        return None
    if kind == "bool":
        _check(isinstance(value, bool), s.name, f"must be true or false (got {shown(value)})")
        return value
    if kind == "int":
        _check(isinstance(value, int) and not isinstance(value, bool), s.name, f"must be an integer (got {shown(value)})")
        return value
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, s.name, f"must be a number (got {shown(value)})")
        if isinstance(value, int) and abs(value) > 1e308:  # float() would raise OverflowError
            raise SettingsError(s.name, f"must be a finite number (got {shown(value)})")
        return float(value)
    if kind == "choice":
        names = ", ".join(d.value for d in Decoding)
        _check(isinstance(value, str) and value in Decoding.__members__, s.name, f"must be one of {names} (got {shown(value)})")
        return Decoding(value)
    if kind == "texts":
        items = [value] if isinstance(value, str) else value
        _check(isinstance(items, list) and all(isinstance(v, str) for v in items), s.name, "must be a string or a list of strings")
        return tuple(items)
    if kind == "ids":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        _check(ok, s.name, "must be a list of token ids")
        return tuple(value)
    raise AssertionError(kind)


def from_values(values: Mapping[str, Any], base: GenerationSettings | None = None) -> GenerationSettings:
    """GenerationSettings from field -> value pairs (already of the right type), on top of `base`."""
    return dataclasses.replace(base or GenerationSettings(), **dict(values))


# -- the settings object ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what is generated for one prompt (the model aside). The fields
    and their defaults are the registry's (a test keeps the two in step)."""

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
        """Validate and fill mode-dependent defaults; raises SettingsError naming the setting."""
        s = self
        for setting in REGISTRY:
            _check_one(setting, getattr(s, setting.name))
        _check(
            s.min_new_tokens <= s.max_new_tokens,
            "min_new_tokens",
            f"({s.min_new_tokens}) must not exceed {ref('max_new_tokens')} ({s.max_new_tokens})",
        )
        try:
            decoding = Decoding(s.decoding)  # library callers may pass "beam" as a string
        except ValueError:
            raise SettingsError("decoding", f"must be one of {', '.join(d.value for d in Decoding)} (got {shown(s.decoding)})") from None
        if decoding is Decoding.sample and s.temperature == 0:
            _check(
                s.num_sequences == 1,
                "temperature",
                f"0 means greedy decoding, which has one answer: {ref('num_sequences')} must be 1 (got {s.num_sequences}), or the temperature above 0",
            )
            decoding = Decoding.greedy
        reason = MODES[decoding].one_answer
        if reason is not None:
            _check(
                s.num_sequences == 1,
                "num_sequences",
                f"{reason}: it must be 1 (got {s.num_sequences}), or use {ref('decoding')} sample or beam",
            )
        num_beams = s.num_beams
        if decoding is Decoding.beam:
            num_beams = num_beams if num_beams is not None else max(DEFAULT_NUM_BEAMS, s.num_sequences)
            _check(2 <= num_beams <= MAX_BEAMS, "num_beams", f"must be from 2 to {MAX_BEAMS} for beam search (got {num_beams})")
            _check(
                s.num_sequences <= num_beams,
                "num_sequences",
                f"({s.num_sequences}) must not exceed {ref('num_beams')} ({num_beams})",
            )
            _check(not s.stop_token_ids, "stop_token_ids", "not used by beam search")
        elif s.num_beams is not None:
            raise SettingsError("num_beams", f"only used with {ref('decoding')} beam (got {decoding.value})")
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


def check_value(name: str, value: Any) -> None:
    """SettingsError unless `value` keeps the setting's own rules (bounds, text, items)."""
    _check_one(SETTINGS[name], value)


def _check_one(setting: Setting, value: Any) -> None:
    """One setting's own rules: finite, within its bounds, valid text, not too many items."""
    name = setting.name
    if value is None:
        _check(setting.optional, name, "must be given")
        return
    if setting.kind == "float":
        _check(math.isfinite(value), name, f"must be a finite number (got {shown(value)})")
    if setting.kind in ("int", "float"):
        if not setting.within(value):
            note = f"; {setting.note}" if setting.note else ""
            raise SettingsError(name, f"{setting.bounds_text()} (got {shown(value)}){note}")
    if setting.kind == "texts":
        _check_texts(setting, value)
    if setting.kind == "ids":
        _check(setting.max_items is None or len(value) <= setting.max_items, name, f"at most {setting.max_items} (got {len(value)})")
        for token in value:
            _check(isinstance(token, int) and token >= 0, name, f"must be token ids, 0 or more (got {shown(token)})")


def _check_texts(setting: Setting, values: Iterable[str]) -> None:
    name, items = setting.name, list(values)
    _check(setting.max_items is None or len(items) <= setting.max_items, name, f"at most {setting.max_items} (got {len(items)})")
    for text in items:
        _check(text.strip() != "" if name == "ban" else text != "", name, "must not be empty")
        _check(
            setting.max_chars is None or len(text) <= setting.max_chars,
            name,
            f"at most {setting.max_chars:,} characters each (got {len(text):,})",
        )
        problem = text_problem(text)
        _check(problem is None, name, problem or "")
