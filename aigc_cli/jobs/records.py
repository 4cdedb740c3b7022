"""Batch jobs: prompt sources (args, files, stdin; lines or JSONL), windows of records, ordered and
resumable JSONL output, shards.

Input is read lazily and processed in windows of a few batches, so memory stays bounded whatever
the file's size; each window's records are written in input order as soon as it is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from string import Template
from typing import IO, Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import RecordError, UsageError
from aigc_cli.core.settings import BY_KEY, SettingsError, coerce


class InputFormat(str, Enum):
    auto = "auto"
    lines = "lines"
    jsonl = "jsonl"


@dataclass
class InputRecord:
    """One input record: a prompt to generate for, or the reason it cannot be."""

    ordinal: int  # 0-based position among the input's records (shards split on it)
    line: int  # 1-based line number in the input
    id: Any
    where: str = ""  # how messages name the record: "line 7", "prompt 2"
    prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    error: RecordError | None = None


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard: expected i/N, e.g. 0/4 (got {text!r})") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard: need 0 <= i < N (got {text!r})")
    return i, n


def load_template(path: str) -> Template:
    """A $field template; the file's final newline is not part of the prompt."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return Template(text[:-1] if text.endswith("\n") else text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--template {path}: cannot read ({exc})") from None


# A longer input line is an error record, read past in chunks and never held whole: no prompt that
# fits a model's context comes near it (GPT-2: 1,024 tokens of at most 128 bytes), and a file that is
# one endless line (a binary, a log without newlines) must not fill the memory.
MAX_LINE_BYTES = 64 << 20
TOO_LONG = b"\0line too long\0"  # stands for such a line (a real line has its newline stripped, never this)


def _numbered_lines(raw: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    number = 0
    while True:
        data = raw.readline(MAX_LINE_BYTES + 1)
        if not data:
            return
        number += 1
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while data and not data.endswith(b"\n"):  # the rest of the line, a chunk at a time
                data = raw.readline(1 << 20)
            yield number, TOO_LONG
            continue
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
            data = data[3:]
            if not data:  # the whole file was a byte order mark
                return
        yield number, data.rstrip(b"\n").rstrip(b"\r")


def read_records(raw: IO[bytes], fmt: InputFormat, template: Template | None = None) -> Iterator[InputRecord]:
    """Records of a binary stream, read lazily; `auto` is JSONL when the first non-empty line is a JSON object."""
    lines = _numbered_lines(raw)
    head: list[tuple[int, bytes]] = []
    if fmt is InputFormat.auto:
        fmt = InputFormat.lines
        for number, data in lines:
            head.append((number, data))
            if data is not TOO_LONG and data.strip():
                fmt = InputFormat.jsonl if _is_json_object(data) else InputFormat.lines
                break
    ordinal = 0
    seen: set[str] = set()  # ids so far (JSONL): a repeated id would make --resume refuse the file forever
    for number, data in _chain(head, lines):
        if fmt is InputFormat.jsonl and not data.strip():
            continue  # blank lines separate nothing in JSONL
        record = _parse_line(number, data, fmt, template)
        if fmt is InputFormat.jsonl and record.id is not None:
            key = record_key(record.id)
            if key in seen and record.error is None:
                record.error = RecordError("duplicate_id", f"line {number}: id {record.id!r} was already used by an earlier record")
            seen.add(key)
        record.ordinal = ordinal
        ordinal += 1
        yield record


def records_from_args(prompts: Iterable[str]) -> Iterator[InputRecord]:
    """Prompts given as arguments: ids 0, 1, ..."""
    for i, prompt in enumerate(prompts):
        yield InputRecord(ordinal=i, line=i + 1, id=i, prompt=prompt, where=f"prompt {i + 1}")


def _chain(head: list[tuple[int, bytes]], rest: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    yield from head
    yield from rest


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(jsondata.loads(data), dict)
    except ValueError:
        return False


def _parse_line(number: int, data: bytes, fmt: InputFormat, template: Template | None) -> InputRecord:
    # Lines are identified by their number; a JSONL record by its 'id', else its line number, and
    # an error record whose id cannot be known gets none (its line says where it is).
    record = InputRecord(ordinal=0, line=number, id=number, where=f"line {number}")
    if fmt is InputFormat.jsonl:
        record.id = None
    if data is TOO_LONG:
        record.error = RecordError("line_too_long", f"line {number} is longer than {MAX_LINE_BYTES >> 20} MiB")
        return record
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        record.error = RecordError("invalid_utf8", f"line {number} is not valid UTF-8 (byte {exc.start})")
        return record
    if fmt is InputFormat.lines:
        fields: dict[str, Any] = {"prompt": text}
    else:
        try:
            fields = jsondata.loads(text)
        except ValueError as exc:
            record.error = RecordError("malformed_json", f"line {number} is not valid JSON ({jsondata.reason(exc)})")
            return record
        if not isinstance(fields, dict):
            record.error = RecordError("malformed_json", f"line {number} is not a JSON object")
            return record
        if "id" in fields:
            if isinstance(fields["id"], bool) or not isinstance(fields["id"], (str, int)):
                record.error = RecordError("bad_field", f"line {number}: 'id' must be a string or an integer")
                return record
            record.id = fields["id"]
        else:
            record.id = number
    try:
        record.overrides = _overrides(fields)
        record.prompt = _prompt(fields, template)
    except RecordError as exc:
        exc.text = f"{record.where}: {exc.text}"
        record.error = exc
    return record


def _prompt(fields: dict[str, Any], template: Template | None) -> str:
    if template is not None:
        try:
            return template.substitute({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        except KeyError as exc:
            raise RecordError("template_field", f"the template's ${exc.args[0]} is not a field of this record") from None
        except ValueError as exc:
            raise UsageError(f"--template: {exc}") from None
    prompt = fields.get("prompt")
    if prompt is None:
        raise RecordError("missing_prompt", "no 'prompt' field")
    if not isinstance(prompt, str):
        raise RecordError("bad_field", "'prompt' must be a string")
    return prompt


def _overrides(fields: dict[str, Any]) -> dict[str, Any]:
    """A record's settings, by their JSONL keys in the registry (`n`, `temperature`, `stop`, ...);
    other fields (the prompt, the id, template fields) are not settings."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        setting = BY_KEY.get(key)
        if setting is None:
            continue
        try:
            out[setting.name] = coerce(setting, value)
        except SettingsError as exc:
            raise RecordError("bad_override", exc.render("jsonl"), field=setting.name) from None
    return out


def count_lines(path: str) -> int | None:
    """A quick count for the progress bar's total (files only; stdin is not read twice)."""
    try:
        if os.path.getsize(path) > 2**31:
            return None
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return None


def record_key(record_id: Any) -> str:
    """A record id as a key that tells 1 from "1"."""
    return json.dumps(record_id)
