"""The OpenAI completions API as aigc reads it: request bodies checked into GenerationSettings,
errors in OpenAI's shape naming the request parameter, response and stream-chunk bodies; no HTTP
framework and no torch here (server.py serves it, client.py speaks it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.settings import Decoding, GenerationSettings, SettingsError

DEFAULT_MAX_TOKENS = 16  # as in the OpenAI API
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's limit; OpenAI's is 5)

# GenerationSettings field -> the request parameter that sets it.
PARAMS = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "num_sequences": "n",
}
_TYPES: dict[str, Any] = {
    "model": str,
    "prompt": (str, list),
    "max_tokens": (int, type(None)),
    "temperature": (int, float, type(None)),
    "top_p": (int, float, type(None)),
    "n": (int, type(None)),
    "stream": (bool, type(None)),
    "stream_options": (dict, type(None)),
    "logprobs": (int, type(None)),
    "echo": (bool, type(None)),
    "stop": (str, list, type(None)),
    "presence_penalty": (int, float, type(None)),
    "frequency_penalty": (int, float, type(None)),
    "best_of": (int, type(None)),
    "logit_bias": (dict, type(None)),
    "user": (str, type(None)),
    "suffix": (str, type(None)),
    "seed": (int, type(None)),
    # extensions, under vLLM's names
    "top_k": (int, type(None)),
    "min_p": (int, float, type(None)),
    "typical_p": (int, float, type(None)),
    "repetition_penalty": (int, float, type(None)),
    "no_repeat_ngram_size": (int, type(None)),
    "min_tokens": (int, type(None)),
    "ignore_eos": (bool, type(None)),
    "stop_token_ids": (list, type(None)),
    # aigc's own
    "decoding": (str, type(None)),
    "num_beams": (int, type(None)),
    "length_penalty": (int, float, type(None)),
    "early_stopping": (bool, type(None)),
    "penalty_alpha": (int, float, type(None)),
    "ban": (list, type(None)),
    "return_token_ids": (bool, type(None)),  # vLLM's: each choice's token_ids
    "record_id": (str, int, type(None)),
    "indices": (list, type(None)),
}


class APIError(Exception):
    """A response other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


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


def _given(body: dict[str, Any], key: str, default: float) -> Any:
    """The body's value for `key`, or `default` where it is absent or null."""
    value = body.get(key)
    return default if value is None else value


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = jsondata.loads(raw)
    except ValueError as exc:
        raise bad(f"the request body is not valid JSON ({jsondata.reason(exc)})") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Check a /v1/completions body; APIError (400) naming the parameter otherwise."""
    for key, value in body.items():
        allowed = _TYPES.get(key)
        if allowed is None:
            raise bad(f"unknown parameter '{key}'", key, "unknown_parameter")
        if isinstance(value, bool) and bool not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise bad(f"'{key}' must not be a boolean", key)
        if not isinstance(value, allowed):
            raise bad(f"'{key}' has the wrong type ({type(value).__name__})", key)
    if "model" not in body:
        raise bad("'model' is required", "model")
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key):
            raise bad(f"'{key}' is not supported (use repetition_penalty)", key, "unsupported")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported (use ban or stop_token_ids)", "logit_bias", "unsupported")
    if body.get("suffix"):
        raise bad("'suffix' is not supported: GPT-2 has no fill-in-the-middle", "suffix", "unsupported")

    prompts = _prompts(body["prompt"])
    echo = bool(body.get("echo"))
    max_tokens = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    score_only = max_tokens == 0 and echo
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise bad(f"'max_tokens' must be at least 1, or 0 with echo (got {max_tokens})", "max_tokens")
    n = _int(body, "n", 1, 1)
    best_of = _int(body, "best_of", n, 1)
    if best_of < n:
        raise bad(f"'best_of' ({best_of}) must be at least n ({n})", "best_of")
    stream = bool(body.get("stream"))
    if stream and best_of > n:
        raise bad("'best_of' above n cannot be streamed", "best_of")
    options = body.get("stream_options") or {}
    if options and not stream:
        raise bad("'stream_options' is only allowed with stream", "stream_options")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise bad(f"unknown stream option '{sorted(unknown)[0]}'", "stream_options")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"'logprobs' must be from 0 to {MAX_LOGPROBS} (got {logprobs})", "logprobs")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops) or len(stops) > 16:
        raise bad("'stop' must be a string or a list of at most 16 strings", "stop")
    ids = body.get("stop_token_ids") or []
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    ban = body.get("ban") or []
    if not all(isinstance(w, str) for w in ban):
        raise bad("'ban' must be a list of words", "ban")
    indices = body.get("indices")
    if indices is not None and (not all(isinstance(i, int) and 0 <= i < best_of for i in indices) or len(set(indices)) != len(indices)):
        raise bad(f"'indices' must be distinct sequence numbers below n ({best_of})", "indices")
    if indices is not None and best_of > n:
        raise bad("'indices' cannot be combined with best_of", "indices")

    decoding = body.get("decoding")
    if decoding is None:
        decoding = Decoding.beam.value if body.get("num_beams") not in (None, 1) else Decoding.sample.value
    if decoding not in [d.value for d in Decoding]:
        raise bad(f"'decoding' must be one of {', '.join(d.value for d in Decoding)} (got {decoding!r})", "decoding")
    top_k = body.get("top_k")
    if top_k == -1:  # vLLM's "no limit"
        top_k = 0
    if top_k is None and decoding == Decoding.sample.value:
        top_k = 0  # the OpenAI API has no top-k: none unless asked
    if best_of > n and decoding not in (Decoding.sample.value,):
        raise bad("'best_of' above n needs sampling (beam search ranks its own beams)", "best_of")
    min_tokens = body.get("min_tokens") or 0
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    raw = GenerationSettings(
        max_new_tokens=max(1, max_tokens),
        min_new_tokens=max_tokens if body.get("ignore_eos") else min_tokens,
        decoding=Decoding(decoding),
        num_sequences=best_of,
        temperature=1.0 if temperature is None else float(temperature),
        top_k=top_k,
        top_p=1.0 if top_p is None else float(top_p),
        typical_p=float(body.get("typical_p") or 1.0),
        min_p=float(body["min_p"]) if body.get("min_p") else None,
        num_beams=body.get("num_beams"),
        length_penalty=float(_given(body, "length_penalty", 1.0)),
        early_stopping=bool(body.get("early_stopping")),
        penalty_alpha=float(_given(body, "penalty_alpha", 0.6)),
        repetition_penalty=float(body.get("repetition_penalty") or 1.0),
        no_repeat_ngram_size=body.get("no_repeat_ngram_size") or 0,
        stop=tuple(stops),
        ban=tuple(ban),
        seed=body.get("seed"),
        stop_token_ids=tuple(ids),
    )
    try:
        settings = raw.resolved()
    except SettingsError as exc:
        raise bad(f"'{param_of(exc.field)}': {request_text(exc.text)}", param_of(exc.field)) from None
    return CompletionRequest(
        model=body["model"],
        prompts=prompts,
        settings=settings,
        n=n,
        best_of=best_of,
        seed=body.get("seed"),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        logprobs=logprobs,
        echo=echo,
        record_id=body.get("record_id"),
        indices=indices,
        score_only=score_only,
        return_token_ids=bool(body.get("return_token_ids")),
    )


def request_body(
    model: str, prompt: str, settings: GenerationSettings, seed: int, record_id: Any, indices: Sequence[int] | None, stream: bool
) -> dict[str, Any]:
    """The /v1/completions body that asks an aigc server for exactly what these resolved settings
    generate locally (aigc's client); `completion_request` reads it back to equal settings."""
    s = settings
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": s.max_new_tokens,
        "min_tokens": s.min_new_tokens,
        "decoding": s.decoding.value,
        "n": s.num_sequences,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "typical_p": s.typical_p,
        "min_p": s.min_p,
        "num_beams": s.num_beams,
        "length_penalty": s.length_penalty,
        "early_stopping": s.early_stopping,
        "penalty_alpha": s.penalty_alpha,
        "repetition_penalty": s.repetition_penalty,
        "no_repeat_ngram_size": s.no_repeat_ngram_size,
        "stop": list(s.stop),
        "ban": list(s.ban),
        "stop_token_ids": list(s.stop_token_ids),
        "seed": seed,
        "record_id": record_id,
        "indices": list(indices) if indices is not None else None,
        "return_token_ids": True,
        "stream": stream,
    }
    return {k: v for k, v in body.items() if v is not None}


def param_of(field: str) -> str:
    return PARAMS.get(field, field)


def request_text(text: str) -> str:
    """A settings message with the CLI flags it quotes named as request parameters."""
    text = text.replace("-n/--num-sequences", "n").replace("--max-new-tokens", "max_tokens").replace("--min-new-tokens", "min_tokens")
    text = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)
    return re.sub(r"(?<![\w-])-n (\d+)", r"n=\1", text)


def _int(body: dict[str, Any], key: str, default: int, low: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if value < low:
        raise bad(f"'{key}' must be at least {low} (got {value})", key)
    return int(value)


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad("'prompt' must not be empty", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    out: list[str | list[int]] = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    return out


def finish_reason(aigc_reason: str) -> str:
    """aigc's "eos" and "stop" are both OpenAI's "stop"."""
    return "length" if aigc_reason == "length" else "stop"


def logprobs_body(
    tokens: Sequence[str], token_logprobs: Sequence[float | None], top: Sequence[dict[str, float] | None], offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object; offsets count characters from `offset`."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": list(tokens), "token_logprobs": list(token_logprobs), "top_logprobs": list(top), "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


# -- chat, with the server's --chat-template ---------------------------------------------------

_CHAT_ONLY = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"}


def chat_request(body: dict[str, Any], template: str, tokenizer: Any) -> dict[str, Any]:
    """A /v1/chat/completions body as the /v1/completions body that continues the rendered
    conversation (the template gets `messages`, `add_generation_prompt`, `bos_token`, `eos_token`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad("each message needs a string 'role' and a string 'content'", "messages")
    for key in ("tools", "tool_choice", "response_format"):
        if body.get(key) is not None:
            raise bad(f"'{key}' is not supported", key, "unsupported")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported for chat; use /v1/completions", "logprobs", "unsupported")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        prompt = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=getattr(tokenizer, "bos_token", "") or "",
            eos_token=getattr(tokenizer, "eos_token", "") or "",
        )
    except TemplateError as exc:
        raise APIError(500, f"the server's chat template failed: {exc}", code="chat_template") from None
    out = {k: v for k, v in body.items() if k not in _CHAT_ONLY}
    if body.get("max_completion_tokens") is not None and "max_tokens" not in out:
        out["max_tokens"] = body["max_completion_tokens"]
    out["prompt"] = prompt
    return out


def chat_response(completion: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": None,
                "finish_reason": c["finish_reason"],
            }
            for c in completion["choices"]
        ],
        "usage": completion["usage"],
    }


def chat_chunk(event: dict[str, Any], opened: set[int]) -> list[dict[str, Any]]:
    """A completion stream event as chat.completion.chunk events; a choice's first one carries the role."""
    base = {"id": "chat" + event["id"], "object": "chat.completion.chunk", "created": event["created"], "model": event["model"]}
    if not event["choices"]:
        return [{**base, "choices": [], "usage": event.get("usage")}]
    out = []
    for c in event["choices"]:
        delta: dict[str, Any] = {"content": c["text"]} if c["text"] or c["finish_reason"] is None else {}
        if c["index"] not in opened:
            opened.add(c["index"])
            delta = {"role": "assistant", **delta}
        chunk = {**base, "choices": [{"index": c["index"], "delta": delta, "logprobs": None, "finish_reason": c["finish_reason"]}]}
        if "usage" in event:
            chunk["usage"] = event["usage"]
        out.append(chunk)
    return out
