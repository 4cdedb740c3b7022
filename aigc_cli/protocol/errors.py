"""OpenAI's error shape, and the request body read as JSON: every refusal names the field at fault."""

from __future__ import annotations

import json
from typing import Any

from aigc_cli.core import jsondata


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

    def json(self) -> bytes:
        """The body as bytes, ASCII-escaped: a message may quote a client's invalid text (a lone
        surrogate), which must never make the error itself fail to encode."""
        return json.dumps(self.body(), ensure_ascii=True).encode()


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object."""
    try:
        body = jsondata.loads(raw)
    except ValueError as exc:
        raise bad(f"the request body is not valid JSON ({jsondata.reason(exc)})") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def unknown_parameter(key: str) -> APIError:
    """The 400 for a key the endpoint does not take: its param is the key as sent (cut to 200
    characters; the body is ASCII-escaped, so a key with a lone surrogate still travels)."""
    return bad(f"unknown parameter {quoted(key)}", key if len(key) <= 200 else key[:197] + "...", "unknown_parameter")


def quoted(value: Any, limit: int = 40) -> str:
    """A client's value inside a message: repr (lone surrogates escaped), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
