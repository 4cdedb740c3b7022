"""Where a job's prompts come from: arguments, a file or stdin (read only when asked for, or when
nothing else was given and stdin is not a terminal)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from string import Template

from aigc_cli.core.errors import UsageError
from aigc_cli.core.settings import check_text
from aigc_cli.jobs.records import InputFormat, InputRecord, count_lines, read_records, records_from_args


@dataclass
class PromptSource:
    """Arguments (`kind` "args"), a file or stdin."""

    kind: str
    prompts: list[str] = field(default_factory=list)
    path: str | None = None

    @property
    def many(self) -> bool:
        return self.kind != "args" or len(self.prompts) > 1

    @property
    def total(self) -> int | None:
        return count_lines(self.path) if self.kind == "file" and self.path is not None else None

    @property
    def inputs(self) -> list[str | int]:
        """The paths (or stdin's descriptor) the job reads, which its output must not be."""
        if self.kind == "file" and self.path is not None:
            return [self.path]
        return [0] if self.kind == "stdin" else []

    def records(self, template: Template | None, input_format: InputFormat) -> Iterator[InputRecord]:
        if self.kind == "args":
            yield from records_from_args(self.prompts)
        elif self.kind == "stdin":
            yield from read_records(sys.stdin.buffer, input_format, template)
        else:
            assert self.path is not None
            with open(self.path, "rb") as raw:
                yield from read_records(raw, input_format, template)


def prompt_source(prompts: list[str] | None, file: str | None) -> PromptSource:
    """Arguments, -f FILE, '-' or a piped stdin; UsageError naming the flag or prompt otherwise."""
    prompts = prompts or []
    if file is not None:
        if prompts:
            raise UsageError("-f/--file: give prompts either as arguments or in a file, not both")
        if file == "-":
            return PromptSource("stdin")
        check_text(file, "-f/--file")
        if not os.path.isfile(file):
            raise UsageError(f"-f/--file {file}: " + ("is a directory" if os.path.isdir(file) else "no such file"))
        return PromptSource("file", path=file)
    if prompts == ["-"]:
        return PromptSource("stdin")
    if "-" in prompts:
        raise UsageError("'-' (read stdin) cannot be mixed with prompt arguments")
    if not prompts:
        if stdin_is_terminal():
            raise UsageError("no prompt given: pass prompts as arguments, -f FILE, or pipe them to stdin")
        return PromptSource("stdin")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i + 1}")
        if p == "" or p.isspace():
            raise UsageError(f"prompt {i + 1} is empty")
    return PromptSource("args", prompts=prompts)


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True
