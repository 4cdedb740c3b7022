"""The generate pipeline as one library call: a record source in, ordered records out.

    job = GenerateJob(records=lambda: read_records(open("in.jsonl", "rb"), InputFormat.auto),
                      settings=GenerationSettings(seed=1).resolved(), output="out.jsonl")
    summary = GeneratePipeline(job).run(load=lambda: Engine.load("gpt2"), make_emit=...)

The order of its steps is what keeps users' work safe: the output file is checked, opened and
locked before the model loads (a bad `-o` fails in a second), the resume state is read from it,
and it is emptied only once the model is there. The engine may be local (`engine.Engine`),
remote (`client.RemoteEngine`) or anything with the same batch interface (`Generator`): the CLI,
the server's client and a distributed backend share this code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aigc_cli.engine.seeds import run_seed
from aigc_cli.jobs.batch import BatchJob, Summary
from aigc_cli.jobs.records import InputRecord
from aigc_cli.jobs.resume import ResumeState, compacted, resume_state
from aigc_cli.jobs.outfile import OutputFile
from aigc_cli.core.settings import GenerationSettings

T = TypeVar("T")
Emit = Callable[[Any], None]  # gets a Completion (with its JSONL record) or an error record dict
OnText = Callable[[Any, str], None]


class Generator(Protocol):
    """What the pipeline needs of an engine."""

    name: str

    @property
    def revision(self) -> str: ...

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]: ...

    def stream(
        self, items: Iterable[T], request_of: Callable[[T], Any], batch_size: int | None = None, on_text: OnText | None = None
    ) -> Iterator[tuple[T, list[Any]]]: ...


@dataclass
class GenerateJob:
    records: Callable[[], Iterable[InputRecord]]  # the record source, read once, lazily
    settings: GenerationSettings  # resolved; seed None: the resumed file's seed, else a random one
    output: str | None = None  # a JSONL file; None: the caller's own stream
    inputs: list[str | int] = field(default_factory=list)  # paths (or fds) the output must not be
    resume: bool = False  # skip what `output` holds, append the rest
    shard: tuple[int, int] | None = None
    batch_size: int | None = None  # None: auto
    strict: bool = False  # stop at the first bad record
    provenance: bool = True  # each record carries model, revision, settings and fingerprint (JSONL)
    retry_errors: bool = False  # with resume: run again the records the output holds error records for


class GeneratePipeline:
    """One run of a GenerateJob; `summary` stays readable after an interruption."""

    def __init__(self, job: GenerateJob) -> None:
        self.job = job
        self.summary = Summary()
        self.settings = job.settings  # with the seed chosen, once the run has started

    def run(
        self,
        load: Callable[[], Generator],
        make_emit: Callable[[OutputFile | None, GenerationSettings], tuple[Emit, OnText | None]],
        on_progress: Callable[[Summary], None] | None = None,
    ) -> Summary:
        """Open and lock the output, read its resume state, `load()` the engine, choose the seed,
        empty the output unless resuming, then generate every record of the source in order.
        `make_emit(sink, settings)` gets the output file (None: no -o) and the final settings and
        returns where completions and error records go, and a streaming callback or None."""
        job = self.job
        out = OutputFile.open(job.output, job.resume, job.inputs) if job.output is not None else None
        engine: Generator | None = None
        try:
            state: ResumeState | None = resume_state(out.read_existing(), job.output or "") if job.resume and out is not None else None
            engine = load()
            self.settings = _with_seed(job.settings, state)
            if out is not None:
                out.start()
            emit, on_text = make_emit(out, self.settings)
            batch = BatchJob(
                engine=engine,
                settings=self.settings,
                emit=emit,
                provenance=job.provenance,
                batch_size=job.batch_size,
                strict=job.strict,
                shard=job.shard,
                resume=state,
                output_name=job.output or "-",
                on_progress=on_progress,
                on_text=on_text,
                retry_errors=job.retry_errors,
                summary=self.summary,
            )
            summary = batch.run(job.records())
            if batch.retried and out is not None:  # retried records take their error records' places
                out.replace(compacted(out.read_existing(), batch.retried))
            return summary
        finally:
            if out is not None:
                out.close()
            close = getattr(engine, "close", None)  # a cluster's workers, a server connection
            if close is not None:
                close()


def _with_seed(settings: GenerationSettings, state: ResumeState | None) -> GenerationSettings:
    """The run's base seed: the one given, else the resumed file's, else a fresh random one."""
    if settings.seed is not None:
        return settings
    known = state.seed if state is not None else None
    return dataclasses.replace(settings, seed=run_seed(known))
