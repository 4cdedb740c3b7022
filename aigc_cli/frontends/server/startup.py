"""Start-up and shutdown: the socket bound before the model loads, uvicorn serving the app, and a
drain on SIGTERM or Ctrl-C: no new work (/health answers 503 "draining"), the requests in flight
finish within --shutdown-timeout, then each one still running ends with an error the client can
see (an error event in a stream, a 503 body otherwise), and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from aigc_cli.core.errors import UsageError
from aigc_cli.frontends.server.routes import create_app
from aigc_cli.frontends.server.state import LOOPBACK, ServerOptions, ServerState
from aigc_cli.protocol.errors import APIError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a port in use fails in a second)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def _server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, whose first signal drains instead of closing the socket at once."""

        state: ServerState
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.state.draining or self.loop is None:  # a second signal: stop now
                super().handle_exit(sig, frame)
                self.force_exit = True
                return
            self._captured_signals.append(sig)
            self.state.draining = True
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            state = self.state
            timeout = state.options.shutdown_timeout
            state.log(f"aigc serve: draining: {len(state.jobs)} requests in flight, {timeout:g} s to finish")
            deadline = time.monotonic() + timeout
            while state.jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if state.jobs:
                state.log(f"aigc serve: ending {len(state.jobs)} requests still running (--shutdown-timeout {timeout:g})")
                for job in list(state.jobs):
                    job.abort(APIError(503, "the server is shutting down", code="shutting_down"))
                await asyncio.sleep(0.2)  # their error events and bodies go out
            self.should_exit = True

    return DrainingServer


def serve(options: ServerOptions, log: Callable[[str], None]) -> int:
    """Serve until SIGTERM or Ctrl-C (then drain); returns the exit code (3 when the model cannot load)."""
    import uvicorn

    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    state = ServerState(options, log)
    if options.host not in LOOPBACK and options.api_key is None:
        log(f"aigc serve: warning: listening on {options.host} without an API key: anyone who can reach it can use it (--api-key)")
    config = uvicorn.Config(
        create_app(state), log_level="critical", access_log=False, lifespan="on", server_header=False, timeout_graceful_shutdown=2
    )
    server = _server_class()(config)
    server.state = state
    state.server = server
    shown = f"[{host}]" if ":" in host else host
    log(f"aigc serve: listening on http://{shown}:{port} (OpenAI API under /v1); loading {options.spec.name}...")
    # uvicorn re-raises the signal it caught once it has shut down; a handler that does nothing
    # lets SIGTERM end the process with 0 after the drain.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stderr.flush()
    return state.exit_code
