"""The engine behind a server: one thread owns the scheduler and runs every kind of work (rows on
the running batch, beam search and prompt scoring between two steps); callers on any thread hand it
requests and get their events back. No HTTP here.

    loop = EngineLoop(engine, max_rows=64, max_queue=256)
    loop.start()
    ticket = loop.admit(cost)                      # QueueFullError / TooBigError before any work
    loop.generate(ticket, requests, listener)      # listener(event) runs on the engine thread
    loop.release(ticket)                           # done, or the client left: its work stops
    loop.stop(timeout)                             # after the running work finishes

Rows are made by the engine (`Engine.row_specs`), as for `aigc generate`: a request's text does not
depend on which front end asked. A row that fails (its settings, a processor, a fault) fails alone
with a `Failed` event; a static request (beam search) that fails gives a `Done` whose result is its
RecordError. `admit` counts every kind of work against one budget, whether the engine is busy or
idle: a sampled request costs its sequences, a beam request its beams, a scoring request one per
prompt.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.core.errors import RecordError
from aigc_cli.engine.engine import AUTO_KV_BUDGET, Engine
from aigc_cli.engine.requests import Completion, Request
from aigc_cli.engine.scheduler import Failed, Finished, Scheduler, Token
from aigc_cli.engine.stream import failure


class QueueFullError(Exception):
    """More work is running or waiting than the server takes now (`max_queue`): try again later."""


class TooBigError(Exception):
    """One request asks for more work than the server can ever take at once."""


class StoppingError(Exception):
    """The loop is shutting down and takes no new work."""


@dataclass
class Done:
    """The whole result of one request run between two steps (beam search, static batches) or of
    a scoring call: completions, a RecordError, or whatever the call returned."""

    key: Hashable
    result: Any


Event = Token | Finished | Failed | Done
Listener = Callable[[Event], None]


@dataclass
class Ticket:
    """One client request's claim on the engine: its cost, its rows, whether it was released."""

    id: int
    cost: int
    rows: set[Hashable] = field(default_factory=set)  # scheduler rows not yet finished (engine thread)
    released: bool = False

    def stopped(self) -> bool:
        return self.released


@dataclass
class _Stats:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_rows: int = 0


class EngineLoop:
    """Runs the scheduler on its own thread; thread-safe `admit`, `generate`, `score`, `call`,
    `release` and `stop`."""

    def __init__(self, engine: Engine, max_rows: int | None = None, max_queue: int = 256) -> None:
        self.engine = engine
        gpu = engine.lm.device == "cuda"
        self.max_rows = max_rows or engine.default_batch
        self.max_queue = max_queue
        self.capacity = self.max_rows + max_queue  # cost units running and waiting at once
        self.sched = Scheduler(engine.lm, self.max_rows, AUTO_KV_BUDGET if max_rows is None and not gpu else None)
        self.stats = _Stats()
        self._cond = threading.Condition()
        self._inbox: deque[Callable[[], None]] = deque()
        self._listeners: dict[Hashable, tuple[Ticket, Listener]] = {}  # row key -> owner (engine thread only)
        self._cost = 0  # admitted and not yet released
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="aigc-engine", daemon=True)

    # -- any thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self.sched.live)

    @property
    def waiting(self) -> int:
        return max(0, self._cost - self.running)

    @property
    def outstanding(self) -> int:
        """Cost admitted and not yet released."""
        return self._cost

    def admit(self, cost: int) -> Ticket:
        """Claim `cost` units of work before anything is built; QueueFullError when running and
        waiting work would pass `max_rows + max_queue`, TooBigError when this request alone does."""
        cost = max(1, cost)
        with self._cond:
            if self._stopping:
                raise StoppingError("the server is shutting down")
            if cost > self.capacity:
                raise TooBigError(f"this request asks for {cost:,} sequences at once; the server takes at most {self.capacity:,}")
            if self._cost + cost > self.capacity:
                raise QueueFullError(f"{self._cost:,} sequences are running or waiting; the queue holds {self.max_queue:,}")
            self._cost += cost
            return Ticket(next(self._ids), cost)

    def release(self, ticket: Ticket) -> None:
        """The request is over (answered, failed, or its client left): its rows leave at the next
        step, its calls stop at their next check, its cost is free again."""
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self._cost -= ticket.cost
            self._post(lambda: self._drop(ticket))

    def generate(self, ticket: Ticket, requests: Sequence[Request], listener: Listener, logprobs: bool = False, top: int = 0) -> None:
        """Run prepared requests: scheduler rows keyed (ticket id, request position, sequence
        index), static requests as one `Done` keyed (ticket id, request position)."""
        self._submit(lambda: self._start(ticket, requests, listener, logprobs, top))

    def call(self, ticket: Ticket, key: Hashable, fn: Callable[[Ticket], Any], listener: Listener) -> None:
        """Run `fn(ticket)` on the engine thread between two steps; `listener(Done(key, result))`
        gets its result there (a RecordError when it raised). `fn` should check `ticket.stopped()`."""
        self._submit(lambda: listener(Done(key, self._guarded(fn, ticket))))

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work; return once what was submitted is done (or `timeout` seconds passed)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                raise StoppingError("the server is shutting down")
            self._post(job)

    def _post(self, job: Callable[[], None]) -> None:  # with self._cond held
        self._inbox.append(job)
        self._cond.notify()

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.sched.busy and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._inbox and not self.sched.busy:
                    return
                jobs = list(self._inbox)
                self._inbox.clear()
            for job in jobs:
                job()
            if self.sched.busy:
                try:
                    events = self.sched.step()
                except Exception as exc:  # noqa: BLE001 - a fault outside any row: every caller hears of it
                    self._fail_all(exc)
                    continue
                self._dispatch(events)

    def _start(self, ticket: Ticket, requests: Sequence[Request], listener: Listener, logprobs: bool, top: int) -> None:
        for p, request in enumerate(requests):
            if ticket.stopped():
                return
            if not self.engine.on_scheduler(request):
                listener(Done((ticket.id, p), self._guarded(functools.partial(self._static, request=request), ticket)))
                continue
            specs = self.engine.row_specs(request, functools.partial(_row_key, ticket.id, p), logprobs, top)
            for spec in specs:
                try:
                    self.sched.submit(spec)
                except Exception as exc:  # noqa: BLE001 - this row fails alone
                    listener(Failed(spec.key, exc))
                    continue
                ticket.rows.add(spec.key)
                self._listeners[spec.key] = (ticket, listener)
                self.stats.prompt_tokens += len(spec.prompt_ids)

    def _static(self, ticket: Ticket, *, request: Request) -> list[Completion] | RecordError:
        """Beam search (or a model without the scheduler), run whole now; stops when released."""
        for _, result in self.engine.stream([request], lambda r: r, batch_size=1, stop=ticket.stopped):
            return result
        return RecordError("generation_failed", "no result")

    @staticmethod
    def _guarded(fn: Callable[[Ticket], Any], ticket: Ticket) -> Any:
        try:
            return fn(ticket)
        except Exception as exc:  # noqa: BLE001 - handed to the caller as its request's error
            return failure(exc)

    def _drop(self, ticket: Ticket) -> None:
        for key in list(ticket.rows):
            self.sched.cancel(key)
            self._listeners.pop(key, None)
        ticket.rows.clear()

    def _dispatch(self, events: list[Token | Finished | Failed]) -> None:
        for event in events:
            owner = self._listeners.get(event.key)
            if owner is None:
                continue
            ticket, listener = owner
            if isinstance(event, Token):
                self.stats.generated_tokens += 1
            else:
                del self._listeners[event.key]
                ticket.rows.discard(event.key)
                self.stats.finished_rows += 1
            listener(event)

    def _fail_all(self, exc: BaseException) -> None:
        """The scheduler raised outside any row (a bug): fail every row it held and start afresh."""
        listeners, self._listeners = self._listeners, {}
        self.sched = Scheduler(self.engine.lm, self.sched.max_rows, self.sched.kv_budget)
        for key, (ticket, listener) in listeners.items():
            ticket.rows.discard(key)
            listener(Failed(key, exc))


def _row_key(ticket: int, position: int, index: int) -> tuple[int, int, int]:
    return (ticket, position, index)
