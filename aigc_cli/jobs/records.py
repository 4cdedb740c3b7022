"""Batch jobs: prompt sources (args, files, stdin; lines or JSONL), windows of records, ordered and
resumable JSONL output, shards.

Input is read lazily and processed in windows of a few batches, so memory stays bounded whatever
the file's size; each window's records are written in input order as soon as it is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from string import Template
from typing import IO, Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import RecordError, UsageError
from aigc_cli.core.settings import BY_KEY, GenerationSettings, SettingsError, check_value, coerce


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
            key = _key(record.id)
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


# How sampled tokens are drawn: part of every fingerprint, so that --resume never mixes records of
# different draws: the inverse-CDF draw (before 2026-11-30), the one-stage Gumbel race ("race-1"),
# the race in two stages over more than 1,024 candidates ("race-2").
DRAW = "race-2"


def fingerprint(model: str, revision: str, settings_record: dict[str, Any], seed: int, prompt: str) -> str:
    """Identifies what a record was generated from; --resume skips only records with the same one."""
    blob = json.dumps([model, revision, settings_record, seed, prompt, DRAW], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ResumeState:
    """What an earlier run of the same job already wrote to the output file."""

    done: dict[str, dict[int, str]] = field(default_factory=dict)  # json(id) -> index -> fingerprint
    error_lines: set[int] = field(default_factory=set)  # input lines that got an error record
    seed: int | None = None
    records: int = 0

    def has(self, record_id: Any, index: int, fp: str, path: str) -> bool:
        got = self.done.get(_key(record_id), {}).get(index)
        if got is not None and got != fp:
            raise UsageError(
                f"--resume: {path} holds record id {record_id!r} made with other settings, seed, prompt or model; "
                "use a new --output file or the original options"
            )
        return got is not None


def _key(record_id: Any) -> str:
    return json.dumps(record_id)


def resume_state(data: bytes, path: str) -> ResumeState:
    """What an interrupted run wrote (complete lines only)."""
    state = ResumeState()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = jsondata.loads(line)
            if "error" in rec:
                state.error_lines.add(int(rec["line"]))
                state.records += 1
                continue
            key = _key(rec["id"])
            index = int(rec["index"])
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--resume: {path} line {number} is not an aigc JSONL record; not appending to it") from None
        state.records += 1
        state.done.setdefault(key, {})[index] = rec.get("fingerprint", "")
        if state.seed is None:
            state.seed = rec.get("settings", {}).get("seed")
    return state


@dataclass
class Summary:
    records: int = 0
    sequences: int = 0
    errors: int = 0
    tokens: int = 0


@dataclass
class BatchJob:
    """One run over a stream of records with one engine and one set of base settings."""

    engine: Any
    settings: GenerationSettings  # resolved, with the run's base seed
    emit: Callable[[Any], None]  # gets a Completion (with extra fields) or an error record dict
    provenance: bool = True  # settings and fingerprint on every completion (JSONL output)
    batch_size: int | None = None
    strict: bool = False
    shard: tuple[int, int] | None = None
    resume: ResumeState | None = None
    output_name: str = "-"
    on_progress: Callable[[Summary], None] | None = None
    on_text: Callable[[Any, str], None] | None = None
    summary: Summary = field(default_factory=Summary)

    def run(self, records: Iterable[InputRecord]) -> Summary:
        """Generate for every record (of this shard) and emit its records in input order, each as
        soon as it and every record before it are complete."""
        from aigc_cli.engine.engine import Request

        def planned() -> Iterator[tuple[InputRecord, Any]]:
            for record in records:
                if self.shard is not None and record.ordinal % self.shard[1] != self.shard[0]:
                    continue
                request = self._request(record, Request)
                yield record, request
                if record.error is not None and self.strict:
                    return  # the records before it are still generated and written

        def request_of(pair: tuple[InputRecord, Any]) -> Any:
            request = pair[1]
            return request if request is not None and request.wanted() else None

        for (record, request), completions in self.engine.stream(planned(), request_of, self.batch_size, self.on_text):
            if isinstance(completions, RecordError):  # the engine refused it while generating (a remote worker)
                if not completions.text.startswith(record.where):
                    completions.text = f"{record.where}: {completions.text}"
                record.error, request, completions = completions, None, []
            if request is None:
                if self.strict:
                    assert record.error is not None
                    raise UsageError(record.error.message)
                self._emit_error(record)
            for completion in completions:
                if self.provenance:
                    completion.record = generated_record(completion, self.engine.name, self.engine.revision, request.settings)
                self.emit(completion)
                self.summary.sequences += 1
                self.summary.tokens += completion.completion_tokens
            self.summary.records += 1
            if self.on_progress is not None:
                self.on_progress(self.summary)
        return self.summary

    def _request(self, record: InputRecord, request_type: type) -> Any:
        if record.error is not None:
            return None
        overrides = dict(record.overrides)
        seed = overrides.pop("seed", None)
        seed = self.settings.seed if seed is None else seed
        try:
            try:
                check_value("seed", seed)
                settings = self.settings.with_overrides(**overrides) if overrides else self.settings
            except SettingsError as exc:
                raise RecordError("bad_override", exc.render("jsonl"), field=exc.field) from None
            ids = tuple(self.engine.encode(record.prompt, settings))
        except RecordError as exc:
            if not exc.message.startswith(record.where):
                exc.text = f"{record.where}: {exc.text}"
            record.error = exc
            return None
        request = request_type(id=record.id, prompt=record.prompt, settings=settings, seed=seed, prompt_ids=ids)
        if self.resume is None:
            return request
        fp = record_fingerprint(self.engine, request)
        wanted = tuple(i for i in range(settings.num_sequences) if not self.resume.has(record.id, i, fp, self.output_name))
        return dataclasses.replace(request, indices=wanted)

    def _emit_error(self, record: InputRecord) -> None:
        self.summary.errors += 1  # also when an earlier run wrote it: the exit code covers the whole file
        if self.resume is not None and record.line in self.resume.error_lines:
            return
        assert record.error is not None
        self.emit({"id": record.id, "line": record.line, "error": {"code": record.error.code, "message": record.error.render("jsonl")}})


def record_fingerprint(engine: Any, request: Any) -> str:
    return fingerprint(engine.name, engine.revision, request.settings.as_record(), request.seed, request.prompt)


def generated_record(c: Any, model: str, revision: str, settings: GenerationSettings) -> dict[str, Any]:
    """The JSONL record of one generated sequence: what was asked, what came out, where it came
    from (model, revision, every resolved setting) and the fingerprint --resume compares."""
    record = {
        "id": c.id,
        "index": c.index,
        "prompt": c.prompt,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "seed": c.seed,
        "model": model,
        "revision": revision,
        "settings": settings.as_record(),
    }
    record["fingerprint"] = fingerprint(model, revision, record["settings"], c.seed, c.prompt)
    return record


def count_lines(path: str) -> int | None:
    """A quick count for the progress bar's total (files only; stdin is not read twice)."""
    try:
        if os.path.getsize(path) > 2**31:
            return None
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return None
