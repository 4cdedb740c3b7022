"""How every command reads a text file (or '-', stdin): UTF-8, a byte order mark dropped, Windows
line ends read as "\\n"; a whole text refused naming the file and the byte, or read line by line
where a bad line is reported (file, line, reason) and the rest goes on; no torch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aigc_cli.core.errors import UsageError

BOM = b"\xef\xbb\xbf"


def read_bytes(path: str, flag: str = "") -> bytes:
    """A file's bytes ('-': stdin); UsageError naming the flag and file when it cannot be read."""
    name = f"{flag} {path}".strip()
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{name}: is a directory") from None
    except OSError as exc:
        raise UsageError(f"{name}: cannot read ({exc.strerror})") from None


def read_text(path: str, flag: str = "") -> str:
    """A whole text file as one string: UTF-8 (UsageError naming the file, line and byte if not),
    its BOM dropped, "\\r\\n" read as "\\n"."""
    data = read_bytes(path, flag).removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{f'{flag} {path}'.strip()}: not valid UTF-8 (line {line}, byte {exc.start})") from None
    return text.replace("\r\n", "\n")


@dataclass
class Line:
    number: int  # 1-based
    text: str | None  # None when the line is not valid UTF-8
    problem: str | None = None


def read_lines(path: str, flag: str = "") -> Iterator[Line]:
    """A text file's lines, numbered, each decoded on its own: a line that is not UTF-8 comes
    with its problem (and no text), so that the caller reports it and goes on."""
    lines = read_bytes(path, flag).removeprefix(BOM).split(b"\n")
    if lines[-1] == b"":  # the final newline ends the last line; it starts no new one
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            yield Line(number, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield Line(number, None, f"not valid UTF-8 (byte {exc.start} of the line)")


@dataclass
class Problems:
    """Bad items of an input, reported as they are found (file, line, reason) and counted, so that
    a command goes on with the rest and ends with the partial-failure exit code."""

    source: str
    report: object = None  # a callable taking one message line (Messages.warn), or None to keep quiet
    found: list[str] = field(default_factory=list)

    def add(self, line: int | None, reason: str, source: str | None = None) -> None:
        name = source if source is not None else self.source
        where = f"{name} line {line}" if line is not None else name
        message = f"{where}: {reason}"
        self.found.append(message)
        if callable(self.report):
            self.report(message)

    def __len__(self) -> int:
        return len(self.found)
