"""An ordered run over a stream of items: requests are read ahead lazily, their rows decoded on the
continuous-batching scheduler (or in static batches: beam search, poem forms, models behind the
transformers adapter), and each item comes out in input order, as soon as it and every item before
it are done, with its completions or with the RecordError that stopped its request alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from aigc_cli.core.errors import AigcError, RecordError
from aigc_cli.engine.requests import Cancelled, Completion, OnText, Request, joins

if TYPE_CHECKING:
    from aigc_cli.engine.scheduler import RowSpec, Scheduler


class EngineLike(Protocol):
    """What a run needs of `engine.Engine`, which starts runs: typed here, so that this module
    does not import the one that imports it."""

    lm: Any
    context_length: int

    @property
    def default_batch(self) -> int: ...

    @property
    def kv_budget(self) -> int: ...

    def prepared(self, request: Request) -> Request: ...

    def on_scheduler(self, request: Request) -> bool: ...

    def row_specs(
        self, request: Request, key: Callable[[int], Any], logprobs: bool = False, top: int = 0, on_text: OnText | None = None
    ) -> list[RowSpec]: ...

    def streamer(self, request: Request, index: int, on_text: OnText) -> Callable[[str], None]: ...

    def completion(self, request: Request, index: int, result: Any) -> Completion: ...

T = TypeVar("T")


def failure(exc: BaseException) -> RecordError:
    """A fault while decoding one request, as that request's error."""
    if isinstance(exc, RecordError):
        return exc
    if isinstance(exc, AigcError):
        return RecordError("generation_failed", exc.text)
    return RecordError("generation_failed", f"decoding failed: {type(exc).__name__}: {str(exc).strip()[:200]}")


@dataclass
class _Item(Generic[T]):
    n: int  # read number
    item: T
    request: Request | None
    error: RecordError | None = None
    done: dict[int, Completion] = field(default_factory=dict)  # sequence index -> completion

    @property
    def complete(self) -> bool:
        return self.error is not None or self.request is None or all(i in self.done for i in self.request.wanted())


class OrderedRun(Generic[T]):
    """Iterate to get (item, completions or RecordError) in input order."""

    def __init__(
        self,
        engine: EngineLike,
        source: Iterator[T],
        request_of: Callable[[T], Request | None],
        batch_size: int | None,
        on_text: OnText | None,
        processors: Callable[[int], list[Any]] | None,
        logprobs: bool,
        batching: str,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        if batching not in ("continuous", "static", "grouped"):
            raise ValueError(f"batching: {batching!r}")
        from aigc_cli.engine.scheduler import Scheduler

        self.engine, self.source, self.request_of = engine, source, request_of
        self.on_text, self.processors, self.logprobs, self.stop = on_text, processors, logprobs, stop
        self.auto = batch_size is None
        self.cap = batch_size or engine.default_batch
        scheduled = processors is None and engine.lm.model.continuous and batching != "grouped"
        budget = engine.kv_budget if self.auto and engine.lm.device != "cuda" else None
        self.sched: Scheduler | None = Scheduler(engine.lm, self.cap, budget, refill=batching == "continuous") if scheduled else None
        self.ahead: deque[_Item[T]] = deque()  # read, not yet yielded, in input order
        self.by_n: dict[int, _Item[T]] = {}
        self.count = 0
        self.more = True

    def __iter__(self) -> Iterator[tuple[T, list[Completion] | RecordError]]:
        self._fill()
        while self.ahead or self.more:
            if not self.ahead:
                self._read_one()
                continue
            head = self.ahead[0]
            while not head.complete:
                self._work(head)
            self.ahead.popleft()
            del self.by_n[head.n]
            if head.error is not None:
                yield head.item, head.error
            else:
                wanted = head.request.wanted() if head.request is not None else ()
                yield head.item, [head.done[i] for i in wanted]
            self._fill()

    # -- reading ahead ------------------------------------------------------------------------

    def _scheduled(self, request: Request | None) -> bool:
        return request is not None and self.sched is not None and self.engine.on_scheduler(request)

    def _read_one(self) -> bool:
        try:
            item = next(self.source)
        except StopIteration:
            self.more = False
            if self.sched is not None:
                self.sched.last_rows_submitted()
            return False
        entry = _Item(self.count, item, self.request_of(item))
        self.count += 1
        self.ahead.append(entry)
        self.by_n[entry.n] = entry
        if entry.request is not None:
            try:
                entry.request = self.engine.prepared(entry.request)
                if self._scheduled(entry.request):
                    self._submit(entry)
            except Exception as exc:  # noqa: BLE001 - this request alone cannot run
                self._fail(entry, exc)
        return True

    def _submit(self, entry: _Item[T]) -> None:
        assert self.sched is not None and entry.request is not None
        n = entry.n
        for spec in self.engine.row_specs(entry.request, lambda index: (n, index), self.logprobs, on_text=self.on_text):
            self.sched.submit(spec)

    def _fill(self) -> None:
        """Keep about two batches of rows ready behind the running ones."""
        while self.more and (self.sched is None or self.sched.pending < 2 * self.cap) and len(self.ahead) < 4 * self.cap:
            self._read_one()

    def _fail(self, entry: _Item[T], exc: BaseException) -> None:
        entry.error = failure(exc)
        if self.sched is not None and entry.request is not None:
            for index in entry.request.wanted():
                self.sched.cancel((entry.n, index))

    # -- decoding ------------------------------------------------------------------------------

    def _work(self, head: _Item[T]) -> None:
        """One scheduler step, or the static batches that finish the head item."""
        if not self._scheduled(head.request):
            pending = [e for e in self.ahead if e.request is not None and e.error is None and not self._scheduled(e.request)]
            _Static(self.engine, self.cap, self.auto, self.on_text, self.processors, self.logprobs, self.stop).run(pending, head)
            return
        from aigc_cli.engine.scheduler import Failed, Finished

        assert self.sched is not None
        for event in self.sched.step():
            if not isinstance(event, (Finished, Failed)):
                continue
            n, index = cast(tuple[int, int], event.key)  # (read number, sequence index), as submitted
            entry = self.by_n.get(n)
            if entry is None or entry.error is not None or entry.request is None:
                continue
            if isinstance(event, Failed):
                self._fail(entry, event.error)
            else:
                entry.done[index] = self.engine.completion(entry.request, index, event.result)
        self._fill()


class _Static:
    """Static batches: the head request (beam search: alone), or every pending request with its
    settings, similar prompt lengths together; each batch runs until its longest row ends. A batch
    that raises is run again one request at a time, so that only a request that fails alone fails."""

    def __init__(
        self, engine: EngineLike, cap: int, auto: bool, on_text: OnText | None, processors: Any, logprobs: bool, stop: Callable[[], bool] | None
    ) -> None:
        self.engine, self.cap, self.auto = engine, cap, auto
        self.on_text, self.processors, self.logprobs, self.stop = on_text, processors, logprobs, stop

    def run(self, pending: list[_Item[Any]], head: _Item[Any]) -> None:
        assert head.request is not None
        if head.request.settings.mode.runs_on == "beam":
            self._contained([head], self._beam)
            return
        same = [e for e in pending if e.request is not None and _req(e).settings == head.request.settings]
        self._contained(same, self._batches)

    def _contained(self, entries: list[_Item[Any]], run: Callable[[list[_Item[Any]]], None]) -> None:
        try:
            run(entries)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - find the request at fault
            if len(entries) == 1:
                entries[0].error = failure(exc)
                return
            for entry in entries:
                self._contained([entry], run)

    def _beam(self, entries: list[_Item[Any]]) -> None:
        from aigc_cli.engine.decoding import generate_beam

        (entry,) = entries
        req = _req(entry)
        beams = generate_beam(self.engine.lm, list(req.prompt_ids or ()), req.settings, self.processors, self.stop, joins(req.prompt))
        for index in req.wanted():
            entry.done[index] = self.engine.completion(req, index, beams[index])

    def _batches(self, entries: list[_Item[Any]]) -> None:
        from aigc_cli.engine.decoding import generate_rows
        from aigc_cli.engine.seeds import row_seed

        rows = [(e, i) for e in entries for i in _req(e).wanted() if i not in e.done]
        rows.sort(key=lambda row: len(_req(row[0]).prompt_ids or ()))
        settings = _req(entries[0]).settings
        start = 0
        while start < len(rows):
            size = self._auto_rows(rows[start : start + self.cap], settings) if self.auto else self.cap
            chunk, start = rows[start : start + size], start + size
            stream = None
            if self.on_text is not None and len(rows) == 1:
                lone = self.engine.streamer(_req(chunk[0][0]), chunk[0][1], self.on_text)
                stream = lambda _i, text: lone(text)  # noqa: E731
            seeds = [row_seed(_req(e).seed, _req(e).id, i) for e, i in chunk]
            prompts = [list(_req(e).prompt_ids or ()) for e, _ in chunk]
            follows = [joins(_req(e).prompt) for e, _ in chunk]
            out = generate_rows(self.engine.lm, prompts, settings, seeds, stream, self.processors, self.logprobs, self.stop, follows)
            for (e, i), res in zip(chunk, out):
                e.done[i] = self.engine.completion(_req(e), i, res)

    def _auto_rows(self, rows: list[tuple[_Item[Any], int]], settings: Any) -> int:
        """How many of these rows (sorted by prompt length) an automatic CPU batch takes: the most
        whose KV cache, at its full length, stays within the engine's budget (at least one)."""
        lm = self.engine.lm
        per_position = lm.model.kv_bytes_per_position()
        if lm.device == "cuda" or per_position is None:
            return len(rows)
        per_position *= settings.kv_rows()  # contrastive search branches each row into top_k rows

        def cache_bytes(n: int) -> int:  # the n-th row has the longest prompt of the first n
            longest = len(_req(rows[n - 1][0]).prompt_ids or ())
            return n * per_position * min(longest + settings.max_new_tokens, self.engine.context_length)

        n = len(rows)
        while n > 1 and cache_bytes(n) > self.engine.kv_budget:
            n -= 1
        return n


def _req(entry: _Item[Any]) -> Request:
    assert entry.request is not None
    return entry.request
