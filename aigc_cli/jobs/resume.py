"""What an earlier run wrote to the output file, so that `--resume` never repeats or mixes records:
fingerprints of what each record was generated from, the resume state read back from the file, and
the compaction that puts retried records where their error records were (`--retry-errors`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import UsageError
from aigc_cli.core.settings import GenerationSettings
from aigc_cli.jobs.records import record_key

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
    errors: dict[int, str] = field(default_factory=dict)  # input line -> the code of its error record
    seed: int | None = None
    records: int = 0

    @property
    def error_lines(self) -> set[int]:
        return set(self.errors)

    def has(self, record_id: Any, index: int, fp: str, path: str) -> bool:
        got = self.done.get(record_key(record_id), {}).get(index)
        if got is not None and got != fp:
            raise UsageError(
                f"--resume: {path} holds record id {record_id!r} made with other settings, seed, prompt or model; "
                "use a new --output file or the original options"
            )
        return got is not None


def resume_state(data: bytes, path: str) -> ResumeState:
    """What an interrupted run wrote (complete lines only)."""
    state = ResumeState()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = jsondata.loads(line)
            if "error" in rec:
                state.errors[int(rec["line"])] = str(rec["error"].get("code", ""))
                state.records += 1
                continue
            key = record_key(rec["id"])
            index = int(rec["index"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"--resume: {path} line {number} is not an aigc JSONL record; not appending to it") from None
        state.records += 1
        state.done.setdefault(key, {})[index] = rec.get("fingerprint", "")
        if state.seed is None:
            state.seed = rec.get("settings", {}).get("seed")
    return state


def compacted(data: bytes, retried: dict[int, Any]) -> bytes:
    """The output file with each retried record's new lines in the place of its error record
    (`retried`: input line -> record id); the new lines were appended at the end as they were made."""
    keys = {record_key(rid): line for line, rid in retried.items()}
    lines = data.splitlines(keepends=True)
    moved: dict[int, list[tuple[int, bytes]]] = {}
    kept: list[tuple[bytes, int | None]] = []  # (line, input line whose records go here)
    for raw in lines:
        rec = jsondata.loads(raw) if raw.strip() else None
        if isinstance(rec, dict) and "error" in rec and rec.get("line") in retried:
            kept.append((raw, int(rec["line"])))
        elif isinstance(rec, dict) and "error" not in rec and record_key(rec.get("id")) in keys:
            moved.setdefault(keys[record_key(rec.get("id"))], []).append((int(rec.get("index", 0)), raw))
        else:
            kept.append((raw, None))
    out = []
    for raw, line in kept:
        if line is not None and line in moved:
            out += [r for _, r in sorted(moved.pop(line), key=lambda x: x[0])]
        else:
            out.append(raw)
    for rest in moved.values():  # (not expected: their error line was not found) keep them
        out += [r for _, r in rest]
    return b"".join(out)


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
