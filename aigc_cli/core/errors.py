"""Exit codes and the exception hierarchy; imports nothing from the project."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit statuses, documented in README and `aigc --help`."""

    OK = 0
    FAILURE = 1  # any other runtime failure
    USAGE = 2  # bad flag value or combination, empty prompt, bad input file
    MODEL_UNAVAILABLE = 3  # model not found, offline, corrupt weights
    PARTIAL = 4  # a batch job finished but some records are error records
    INTERRUPTED = 130  # SIGINT / SIGTERM


class AigcError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


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
    """One input record cannot be processed; batch jobs turn it into an error record."""

    exit_code = ExitCode.USAGE

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
