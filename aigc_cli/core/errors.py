"""Exit codes and the exception hierarchy; imports nothing of aigc at module level.

A message may refer to a setting with `ref("max_new_tokens")`; each front end renders the
reference in its own words (`--max-new-tokens` on the command line, `max_tokens` in a request,
`max_new_tokens` in a JSONL record), so one error reads right wherever it is shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import IntEnum

_REF = re.compile("\x00([a-z_]+)\x00")
# How the settings registry names a setting on a surface (None: not a setting); core.settings
# registers it as it loads, so that this module imports nothing of aigc (no import cycle).
_named_setting: Callable[[str, str], str | None] = lambda name, surface: None  # noqa: E731


class ExitCode(IntEnum):
    """Process exit statuses, documented in docs/safety.md and `aigc --help`."""

    OK = 0
    FAILURE = 1  # any other runtime failure
    USAGE = 2  # bad flag value or combination, empty prompt, bad input file
    MODEL_UNAVAILABLE = 3  # model not found, offline, corrupt weights
    PARTIAL = 4  # a batch job finished but some records are error records
    INTERRUPTED = 130  # SIGINT / SIGTERM


def ref(name: str) -> str:
    """A reference to a setting inside a message, rendered per surface (see `render`)."""
    return f"\x00{name}\x00"


def render(text: str, surface: str = "cli") -> str:
    """`text` with its setting references named as `surface` ("cli", "api", "jsonl") names them."""
    if "\x00" not in text:
        return text
    return _REF.sub(lambda m: label(m.group(1), surface), text)


def label(name: str, surface: str = "cli") -> str:
    """A setting's (or any field's) name on a surface: `--max-new-tokens`, `max_tokens`, `max_new_tokens`."""
    named = _named_setting(name, surface)
    if named is not None:
        return named
    return "--" + name.replace("_", "-") if surface == "cli" else f"'{name}'"


def name_settings_with(lookup: Callable[[str, str], str | None]) -> None:
    """Called by core.settings once its registry is built: references render by its labels."""
    global _named_setting
    _named_setting = lookup


class AigcError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.text = message  # with setting references; `message` renders them for the command line
        self.hint = hint

    @property
    def message(self) -> str:
        return render(self.text, "cli")

    @message.setter
    def message(self, value: str) -> None:
        self.text = value

    def render(self, surface: str) -> str:
        return render(self.text, surface)

    def __str__(self) -> str:
        return self.message


class UsageError(AigcError):
    """Bad flag value, bad combination of flags, or bad input."""

    exit_code = ExitCode.USAGE


class ModelUnavailableError(AigcError):
    """The model cannot be found, downloaded or read."""

    exit_code = ExitCode.MODEL_UNAVAILABLE


class OutputError(AigcError):
    """The output file cannot be written (a full disk, a file removed from under us)."""

    exit_code = ExitCode.FAILURE


class RecordError(AigcError):
    """One input record (or request) cannot be processed; batch jobs turn it into an error record.
    `field` names the setting or input field at fault, when there is one."""

    exit_code = ExitCode.USAGE

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
