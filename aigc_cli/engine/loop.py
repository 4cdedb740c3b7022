"""The engine behind a server: one thread owns the scheduler, callers on any thread hand it rows and
get their events back; no HTTP here.

    loop = EngineLoop(engine, max_rows=64, max_queue=256)
    loop.start()
    loop.submit([RowSpec(...), ...], listener)   # listener(event) runs on the engine thread
    loop.cancel(keys)                            # rows leave at the next step
    loop.stop()                                  # after the running rows finish

Greedy, sampled and contrastive rows share forward passes on the scheduler; other work (beam
search, prompt scoring) runs on the same thread between two steps, so it never races the scheduler
for the model, and the running rows wait while it runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from aigc_cli.engine.engine import AUTO_KV_BUDGET, DEFAULT_CPU_BATCH, DEFAULT_GPU_BATCH, Engine
from aigc_cli.engine.scheduler import Finished, RowSpec, Scheduler, Token


class QueueFullError(Exception):
    """More rows are waiting than the server takes (`max_queue`)."""


class StoppingError(Exception):
    """The loop is shutting down and takes no new work."""


@dataclass
class Failed:
    """A row that could not finish: the engine raised, or the loop stopped."""

    key: Hashable
    error: BaseException


Event = Token | Finished | Failed
Listener = Callable[[Event], None]


@dataclass
class _Stats:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_rows: int = 0


class EngineLoop:
    """Runs the scheduler on its own thread; thread-safe `submit`, `cancel`, `call` and `stop`."""

    def __init__(self, engine: Engine, max_rows: int | None = None, max_queue: int = 256) -> None:
        self.engine = engine
        gpu = engine.lm.device == "cuda"
        self.max_rows = max_rows or (DEFAULT_GPU_BATCH if gpu else DEFAULT_CPU_BATCH)
        self.max_queue = max_queue
        self.sched = Scheduler(engine.lm, self.max_rows, AUTO_KV_BUDGET if max_rows is None and not gpu else None)
        self.stats = _Stats()
        self._cond = threading.Condition()
        self._inbox: deque[Callable[[], None]] = deque()
        self._listeners: dict[Hashable, Listener] = {}  # engine thread only
        self._outstanding = 0  # rows submitted and not yet finished, failed or cancelled
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
        return max(0, self._outstanding - self.running)

    def submit(self, specs: Sequence[RowSpec], listener: Listener) -> None:
        """Queue rows; `listener` gets each row's events on the engine thread (keep it quick).
        QueueFullError when more than `max_queue` rows would wait for a slot."""
        with self._cond:
            if self._stopping:
                raise StoppingError("the server is shutting down")
            if self._outstanding + len(specs) > self.max_rows + self.max_queue and self._outstanding > 0:
                raise QueueFullError(f"{self._outstanding} sequences are running or waiting; the queue holds {self.max_queue}")
            self._outstanding += len(specs)
            self._post(lambda: self._admit(specs, listener))

    def cancel(self, keys: Sequence[Hashable]) -> None:
        """Drop rows (queued ones at once, running ones at the next step); their listeners hear nothing more."""
        with self._cond:
            self._post(lambda: self._drop(keys))

    def call(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run `fn` on the engine thread between two steps; `done(result, error)` gets the outcome there."""
        with self._cond:
            if self._stopping:
                raise StoppingError("the server is shutting down")
            self._post(lambda: self._call(fn, done))

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work; return once what was submitted is done (or `timeout` seconds passed)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

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
                except Exception as exc:  # noqa: BLE001 - every waiting caller hears of it, the loop goes on
                    self._fail_all(exc)
                    continue
                self._dispatch(events)

    def _admit(self, specs: Sequence[RowSpec], listener: Listener) -> None:
        for spec in specs:
            self._listeners[spec.key] = listener
            self.sched.submit(spec)
            self.stats.prompt_tokens += len(spec.prompt_ids)

    def _drop(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            if self._listeners.pop(key, None) is not None:
                self.sched.cancel(key)
                self._finished_row()

    def _call(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            done(None, exc)
        else:
            done(result, None)

    def _dispatch(self, events: list[Token | Finished]) -> None:
        for event in events:
            listener = self._listeners.get(event.key)
            if listener is None:
                continue
            if isinstance(event, Token):
                self.stats.generated_tokens += 1
            else:
                del self._listeners[event.key]
                self._finished_row()
            listener(event)

    def _finished_row(self) -> None:
        with self._cond:
            self._outstanding -= 1
        self.stats.finished_rows += 1

    def _fail_all(self, exc: BaseException) -> None:
        """The scheduler raised (out of memory, a bug): fail every row it held and start afresh."""
        listeners, self._listeners = self._listeners, {}
        self.sched = Scheduler(self.engine.lm, self.sched.max_rows, self.sched.kv_budget)
        for key, listener in listeners.items():
            self._finished_row()
            listener(Failed(key, exc))
