"""Chat completions over a completion model: the server's --chat-template renders the messages into
a prompt, the completion's body and stream chunks are reshaped as chat's; no HTTP framework."""

from __future__ import annotations

from typing import Any

from aigc_cli.core.settings import text_problem
from aigc_cli.protocol.errors import APIError, bad, quoted, unknown_parameter

_COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}  # completion fields that chat has not
_CHAT_ONLY = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"}


def chat_request(body: dict[str, Any], template: str, tokenizer: Any) -> dict[str, Any]:
    """A /v1/chat/completions body as the /v1/completions body that continues the rendered
    conversation (the template gets `messages`, `add_generation_prompt`, `bos_token`, `eos_token`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad("each message needs a string 'role' and a string 'content'", "messages")
        problem = text_problem(m["role"]) or text_problem(m["content"])
        if problem is not None:
            raise bad(f"'messages': message {i} is {problem}", "messages", "invalid_text")
    _check_chat_fields(body)
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


def _check_chat_fields(body: dict[str, Any]) -> None:
    """The fields chat has and completions has not (the completion check never sees them), and the
    completion fields chat has not (its OpenAPI schema leaves them out): 400 naming the field."""
    unknown = next((k for k in body if k in _COMPLETION_ONLY), None)
    if unknown is not None:
        raise unknown_parameter(unknown)
    for key in ("tools", "tool_choice", "response_format", "top_logprobs"):
        if body.get(key) is not None:
            raise bad(f"'{key}' is not supported", key, "unsupported")
    for key in ("logprobs", "parallel_tool_calls"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise bad(f"'{key}' must be true or false", key)
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported for chat; use /v1/completions", "logprobs", "unsupported")
    most = body.get("max_completion_tokens")
    if most is not None:
        if not isinstance(most, int) or isinstance(most, bool) or most < 1:
            raise bad(f"'max_completion_tokens' must be an integer, 1 or more (got {quoted(most)})", "max_completion_tokens")
        if body.get("max_tokens") not in (None, most):
            raise bad("'max_tokens' and 'max_completion_tokens' differ: give one of them", "max_completion_tokens")


def chat_error(exc: APIError, body: dict[str, Any]) -> APIError:
    """A refusal of the completion made from a chat body, naming the chat body's own field: the
    rendered prompt is its messages, max_tokens its max_completion_tokens when that was given."""
    param = exc.param
    if param == "prompt":
        param = "messages"
    elif param == "max_tokens" and body.get("max_completion_tokens") is not None:
        param = "max_completion_tokens"
    if param == exc.param:
        return exc
    return APIError(exc.status, exc.message.replace("'prompt'", "'messages'"), param, exc.code, exc.kind)


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
