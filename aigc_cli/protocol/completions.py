"""The OpenAI/vLLM completions API as aigc reads it: a request body checked into settings (the
generation settings come from the registry in core/settings.py, under their request names), and
the response and stream-chunk bodies; no HTTP framework and no torch (the server serves it, the
CLI's client speaks it).

Request fields that are not generation settings are declared in `FIELDS` below, each with its JSON
schema and its check; the OpenAPI schema (protocol/schema.py) is built from both tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aigc_cli.core.settings import (
    BY_PARAM,
    MAX_SEQUENCES,
    REGISTRY,
    Decoding,
    GenerationSettings,
    SettingsError,
    check_value,
    coerce,
    text_problem,
)
from aigc_cli.protocol.errors import bad, quoted, unknown_parameter

MAX_LOGPROBS = 20  # top alternatives per token (vLLM's limit; OpenAI's is 5)
MAX_PROMPTS = 1024  # prompts in one request
BEAM_PARAMS = ("num_beams",)


@dataclass(frozen=True)
class Field:
    """A request field that is not a generation setting."""

    name: str
    schema: dict[str, Any]
    help: str
    check: Callable[[Any], None] | None = None


def _kind(*types: type) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) and bool not in types:
            raise TypeError("must not be a boolean")
        if not isinstance(value, types):
            raise TypeError(f"has the wrong type ({type(value).__name__})")

    return check


def _text(value: Any, *types: type) -> None:
    """A string of valid Unicode text (or a value of one of `types`)."""
    _kind(str, *types)(value)
    problem = text_problem(value) if isinstance(value, str) else None
    if problem is not None:
        raise ValueError(f"is {problem}")


_INT_OR_NULL = {"type": ["integer", "null"]}
_BOOL_OR_NULL = {"type": ["boolean", "null"]}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
FIELDS: tuple[Field, ...] = (
    Field("model", {"type": "string"}, "The served model's name (GET /v1/models).", _text),
    Field(
        "prompt",
        {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _TOKENS,
            {"type": "array", "items": _TOKENS, "minItems": 1},
        ]},
        "A string, a list of strings, token ids, or a list of lists of token ids.",
    ),
    Field("stream", _BOOL_OR_NULL, "Server-sent events ending in data: [DONE].", _kind(bool)),
    Field(
        "stream_options",
        {"type": ["object", "null"], "properties": {"include_usage": _BOOL_OR_NULL, "continuous_usage_stats": _BOOL_OR_NULL},
         "additionalProperties": False},
        "include_usage adds a usage chunk before [DONE].", _kind(dict),
    ),
    Field("logprobs", {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS}, "Top alternatives per token (0-20).", _kind(int)),
    Field("echo", _BOOL_OR_NULL, "Return the prompt before the completion (with logprobs: its own log-probabilities).", _kind(bool)),
    Field("best_of", {"type": ["integer", "null"], "minimum": 1}, "Sample this many, return the n best by mean log-probability.", _kind(int)),
    Field("ignore_eos", _BOOL_OR_NULL, "Generate max_tokens tokens whatever the model says (vLLM).", _kind(bool)),
    Field("return_token_ids", _BOOL_OR_NULL, "Each choice also carries its token_ids (vLLM).", _kind(bool)),
    Field("user", {"type": ["string", "null"]}, "The end user (logged nowhere).", _text),
    Field("suffix", {"type": ["string", "null"]}, "Not supported (GPT-2 has no fill-in-the-middle).", _text),
    Field("presence_penalty", _NUMBER_OR_NULL, "Not supported unless 0 (use repetition_penalty).", _kind(int, float)),
    Field("frequency_penalty", _NUMBER_OR_NULL, "Not supported unless 0 (use repetition_penalty).", _kind(int, float)),
    Field("logit_bias", {"type": ["object", "null"]}, "Not supported unless empty (use ban or stop_token_ids).", _kind(dict)),
    Field("record_id", {"type": ["string", "integer", "null"]}, "aigc's client: the record whose sequences these are.", lambda v: _text(v, int)),
    Field("indices", {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}}, "aigc's client: sequence numbers to generate.", _kind(list)),
)
_FIELDS = {f.name: f for f in FIELDS}


@dataclass
class CompletionRequest:
    """A checked /v1/completions body."""

    model: str
    prompts: list[str | list[int]]  # text, or token ids
    settings: GenerationSettings  # resolved; num_sequences is best_of when that is given
    n: int  # choices returned per prompt
    best_of: int
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    echo: bool
    record_id: str | int | None
    indices: list[int] | None  # sequence numbers to generate (aigc's client resuming a file)
    score_only: bool  # max_tokens 0 with echo: the prompt's logprobs, nothing generated
    return_token_ids: bool = False
    max_tokens_given: bool = False  # the body set max_tokens (else the API's default applies)

    @property
    def generated_tokens(self) -> int:
        """Tokens each sequence may add to its prompt (0 when only the prompt is scored)."""
        return 0 if self.score_only else self.settings.max_new_tokens


def completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Check a /v1/completions body; APIError (400) naming the field otherwise."""
    _check_fields(body)
    prompts = _prompts(body["prompt"])
    echo = bool(body.get("echo"))
    n, best_of, stream, options, logprobs, indices = _options(body)
    settings, score_only = _settings(body, echo, n, best_of)
    return CompletionRequest(
        model=body["model"],
        prompts=prompts,
        settings=settings,
        n=n,
        best_of=best_of,
        seed=settings.seed,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        logprobs=logprobs,
        echo=echo,
        record_id=body.get("record_id"),
        indices=indices,
        score_only=score_only,
        return_token_ids=bool(body.get("return_token_ids")),
        max_tokens_given=body.get("max_tokens") is not None,
    )


def _check_fields(body: dict[str, Any]) -> None:
    """Every key known, every request field of its type; unsupported features refused."""
    for key, value in body.items():
        if key not in _FIELDS and key not in BY_PARAM:
            raise unknown_parameter(key)
        field = _FIELDS.get(key)
        if field is not None and field.check is not None:
            try:
                field.check(value)
            except (TypeError, ValueError) as exc:
                raise bad(f"'{key}' {exc}", key) from None
    for key in ("model", "prompt"):
        if key not in body:
            raise bad(f"'{key}' is required", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise bad(f"'{key}' is not supported (use repetition_penalty)", key, "unsupported")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported (use ban or stop_token_ids)", "logit_bias", "unsupported")
    if body.get("suffix"):
        raise bad("'suffix' is not supported: GPT-2 has no fill-in-the-middle", "suffix", "unsupported")


def _options(body: dict[str, Any]) -> tuple[int, int, bool, dict[str, Any], int | None, list[int] | None]:
    """(n, best_of, stream, stream_options, logprobs, indices), checked against each other."""
    n = body.get("n")
    n = 1 if n is None else _setting_value("n", n)
    try:
        check_value("num_sequences", n)
    except SettingsError as exc:
        raise bad(exc.render("api"), "n") from None
    best_of = body.get("best_of")
    best_of = n if best_of is None else best_of
    if best_of < n:
        raise bad(f"'best_of' ({best_of}) must be at least n ({n})", "best_of")
    stream = bool(body.get("stream"))
    if stream and best_of > n:
        raise bad("'best_of' above n cannot be streamed", "best_of")
    options = body.get("stream_options") or {}
    if options and not stream:
        raise bad("'stream_options' is only allowed with stream", "stream_options")
    unknown = [k for k in options if k not in ("include_usage", "continuous_usage_stats")]
    if unknown:
        raise bad(f"unknown stream option {quoted(unknown[0])}", "stream_options")
    if not all(isinstance(v, bool) or v is None for v in options.values()):
        raise bad("'stream_options' values must be true or false", "stream_options")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"'logprobs' must be from 0 to {MAX_LOGPROBS} (got {quoted(logprobs)})", "logprobs")
    indices = body.get("indices")
    if indices is not None:
        ok = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < best_of for i in indices) and len(set(indices)) == len(indices)
        if not ok:
            raise bad(f"'indices' must be distinct sequence numbers below n ({best_of})", "indices")
        if best_of > n:
            raise bad("'indices' cannot be combined with best_of", "indices")
    return n, best_of, stream, options, logprobs, indices


def _setting_value(param: str, value: Any) -> Any:
    """A generation setting's value from the body, typed by the registry (400 naming it)."""
    try:
        return coerce(BY_PARAM[param], value)
    except SettingsError as exc:
        raise bad(exc.render("api"), param) from None


def _settings(body: dict[str, Any], echo: bool, n: int, best_of: int) -> tuple[GenerationSettings, bool]:
    """The generation settings of a body, resolved: every registry setting under its request name,
    null or absent meaning the API's default; (settings, whether only the prompt is scored)."""
    values: dict[str, Any] = {}
    for setting in REGISTRY:
        raw = body.get(setting.param) if setting.param else None
        values[setting.name] = setting.default_for("api") if raw is None else _setting_value(setting.param or "", raw)
    max_tokens = values["max_new_tokens"]
    score_only = max_tokens == 0 and echo
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise bad(f"'max_tokens' must be at least 1, or 0 with echo (got {quoted(max_tokens)})", "max_tokens")
    values["max_new_tokens"] = max(1, max_tokens)
    if body.get("ignore_eos"):
        values["min_new_tokens"] = values["max_new_tokens"]
    if body.get("decoding") is None:  # num_beams above 1 asks for beam search
        values["decoding"] = Decoding.beam if body.get("num_beams") not in (None, 1) else Decoding.sample
    if values["top_k"] == -1:  # vLLM's "no limit"
        values["top_k"] = 0
    if values["top_k"] is None and values["decoding"] is Decoding.sample:
        values["top_k"] = 0  # the OpenAI API has no top-k: none unless asked
    values["num_sequences"] = best_of
    if best_of > n and values["decoding"] is not Decoding.sample:
        raise bad("'best_of' above n needs sampling (beam search ranks its own beams)", "best_of")
    if best_of > MAX_SEQUENCES:
        raise bad(f"'best_of' must be at most {MAX_SEQUENCES} (got {quoted(best_of)})", "best_of")
    try:
        return GenerationSettings(**values).resolved(), score_only
    except SettingsError as exc:
        param = BY_PARAM_NAME.get(exc.field, exc.field)
        raise bad(exc.render("api"), param) from None


BY_PARAM_NAME = {s.name: s.param for s in REGISTRY if s.param}


def request_body(
    model: str, prompt: str, settings: GenerationSettings, seed: int, record_id: Any, indices: Sequence[int] | None, stream: bool
) -> dict[str, Any]:
    """The /v1/completions body that asks an aigc server for exactly what these resolved settings
    generate locally (aigc's client); `completion_request` reads it back to equal settings."""
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    for setting in REGISTRY:
        value = getattr(settings, setting.name)
        if setting.param is None or value is None or (setting.kind in ("texts", "ids") and not value):
            continue
        body[setting.param] = value.value if isinstance(value, Decoding) else list(value) if isinstance(value, tuple) else value
    body.update(seed=seed, record_id=record_id, indices=list(indices) if indices is not None else None, return_token_ids=True, stream=stream)
    return {k: v for k, v in body.items() if v is not None}


def _prompts(prompt: Any) -> list[str | list[int]]:
    def is_ids(p: Any) -> bool:
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str):
        out: list[str | list[int]] = [prompt]
    elif is_ids(prompt):
        out = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        out = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    if len(out) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(out)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
    for p, text in enumerate(out):
        problem = text_problem(text) if isinstance(text, str) else None
        if problem is not None:
            where = f"prompt {p}" if len(out) > 1 else "the prompt"
            raise bad(f"'prompt': {where} is {problem}", "prompt", "invalid_text")
    return out


def finish_reason(aigc_reason: str) -> str:
    """aigc's "eos" and "stop" are both OpenAI's "stop"."""
    return "length" if aigc_reason == "length" else "stop"


def logprobs_body(
    tokens: Sequence[str],
    token_logprobs: Sequence[float | None],
    top: Sequence[dict[str, float] | None],
    offset: int,
    widths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The legacy completions `logprobs` object; offsets count characters from `offset`, each token
    taking `widths` characters of the text (default: its own length; a special token shown by its
    name, such as [CLS], takes none)."""
    offsets, at = [], offset
    for k, t in enumerate(tokens):
        offsets.append(at)
        at += widths[k] if widths is not None else len(t)
    return {"tokens": list(tokens), "token_logprobs": list(token_logprobs), "top_logprobs": list(top), "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
