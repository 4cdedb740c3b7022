"""The server's state: its options, the engine once loaded, the engine loop, the requests in flight;
loading runs beside the socket, so /health answers while the model loads."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.core.errors import AigcError, ExitCode
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.engine.engine import Engine
from aigc_cli.engine.requests import Request as EngineRequest
from aigc_cli.engine.loop import EngineLoop

MAX_BODY = 4 << 20  # bytes of request body (--max-body)
RETRY_AFTER = "1"  # seconds, on 503
SHUTDOWN_TIMEOUT = 10.0  # seconds SIGTERM waits for requests in flight (--shutdown-timeout)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerOptions:
    spec: ModelSpec = field(default_factory=ModelSpec)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    batch_size: int | None = None  # None: auto, as in `aigc generate`
    metrics: bool = False
    chat_template: str | None = None  # the template's text
    max_body: int = MAX_BODY
    shutdown_timeout: float = SHUTDOWN_TIMEOUT


@dataclass
class ServerState:
    options: ServerOptions
    log: Callable[[str], None]
    engine: Engine | None = None
    loop: EngineLoop | None = None
    exit_code: int = 0
    server: Any = None  # uvicorn.Server, to stop it when the model cannot load
    serial: Any = field(default_factory=itertools.count)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Any = None
    jobs: set[Any] = field(default_factory=set)  # completion requests in flight (to end them at shutdown)
    draining: bool = False  # a signal came: no new work, /health answers 503
    preparer: Any = None  # prepare.Preparer, once the model is loaded
    helper: Any = None  # prepare.Helper: the process that prepares large request bodies

    def load(self) -> None:
        """Load the model and start the engine loop (a background thread while the socket serves /health)."""
        o = self.options
        started = time.monotonic()
        try:
            engine = Engine.load(o.spec)
            loop = EngineLoop(engine, o.batch_size, o.max_queue)
            _warm_up(engine)
            loop.start()
        except AigcError as exc:
            self.log(f"aigc serve: error: {exc.message}")
            self._quit(int(exc.exit_code))
            return
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            self.log(f"aigc serve: error: {type(exc).__name__}: {exc}")
            self._quit(int(ExitCode.FAILURE))
            return
        from aigc_cli.frontends.server.prepare import Helper, Preparer

        self.preparer = Preparer(o.spec.name, engine, o.chat_template)
        self.helper = Helper.started(self.preparer, self.log)
        self.engine, self.loop = engine, loop
        precision = engine.lm.dtype if engine.lm.quantize == "none" else f"--quantize {engine.lm.quantize}"
        self.log(f"aigc serve: {o.spec.name} ready in {time.monotonic() - started:.1f} s ({engine.lm.device}, {precision})")

    def _quit(self, code: int) -> None:
        self.exit_code = code
        if self.server is not None:
            self.server.should_exit = True


def _warm_up(engine: Engine) -> None:
    """One short generation, so that the first request does not pay for the kernels' first run."""
    from aigc_cli.core.settings import Decoding, GenerationSettings

    settings = GenerationSettings(max_new_tokens=2, decoding=Decoding.greedy).resolved()
    ids = engine.encode("Hello", settings)
    list(engine.generate([EngineRequest(id=0, prompt="Hello", settings=settings, seed=0, prompt_ids=tuple(ids))]))


# -- the app ------------------------------------------------------------------------------------


