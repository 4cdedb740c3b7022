"""JSON from outside (input records, request bodies, model files, a server's answers): one way to
parse it in which every failure is a ValueError; no torch."""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes) -> Any:
    """`json.loads`, except that text nested too deeply for the parser (`[[[[...` a few thousand
    levels down) is a ValueError like any other malformed JSON, not a RecursionError. Bytes that
    are not UTF-8 are a ValueError too (UnicodeDecodeError is one)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def reason(exc: Exception) -> str:
    """Why `loads` failed, in a few words (without the text itself)."""
    return getattr(exc, "msg", None) or str(exc)
