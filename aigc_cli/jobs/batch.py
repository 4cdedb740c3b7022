"""One batch job: every record of a source generated (or turned into an error record) and emitted
in input order, with the resume state applied and a summary counted per error code."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.core.errors import RecordError, UsageError
from aigc_cli.core.settings import GenerationSettings, SettingsError, check_value
from aigc_cli.jobs.records import InputRecord
from aigc_cli.jobs.resume import ResumeState, generated_record, record_fingerprint

@dataclass
class Summary:
    records: int = 0
    sequences: int = 0
    errors: int = 0
    tokens: int = 0
    codes: Counter[str] = field(default_factory=Counter)  # error records by code

    def error_counts(self) -> str:
        """"2 invalid_text, 1 prompt_too_long": the error records by code, most first."""
        return ", ".join(f"{n} {code}" for code, n in self.codes.most_common())


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
    retry_errors: bool = False  # with a resume state: run the records it holds error records for again
    summary: Summary = field(default_factory=Summary)
    retried: dict[int, Any] = field(default_factory=dict)  # input line -> record id: retried and now done

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
        earlier = self.resume.errors.get(record.line) if self.resume is not None else None
        if earlier is not None and not self.retry_errors:  # its error record counts as done
            record.error = RecordError(earlier, "an error record of an earlier run")
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
        if earlier is not None:  # retried: once done, its records take the error record's place
            self.retried[record.line] = record.id
        return dataclasses.replace(request, indices=wanted)

    def _emit_error(self, record: InputRecord) -> None:
        assert record.error is not None
        self.summary.errors += 1  # also when an earlier run wrote it: the exit code covers the whole file
        self.summary.codes[record.error.code] += 1
        self.retried.pop(record.line, None)
        if self.resume is not None and record.line in self.resume.errors:
            return
        self.emit({"id": record.id, "line": record.line, "error": {"code": record.error.code, "message": record.error.render("jsonl")}})
