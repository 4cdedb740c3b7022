"""Chat completions over a completion model: the server's --chat-template renders the messages into
a prompt, the completion's body and stream chunks are reshaped as chat's; no HTTP framework."""

from __future__ import annotations

from typing import Any

from aigc_cli.core.settings import text_problem
from aigc_cli.protocol.errors import APIError, bad

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
