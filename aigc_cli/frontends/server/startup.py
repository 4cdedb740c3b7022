"""Start-up: the socket bound before the model loads, uvicorn with a graceful SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

from aigc_cli.frontends.server.routes import create_app
from aigc_cli.frontends.server.state import (
    LOOPBACK,
    SHUTDOWN_GRACE,
    ServerOptions,
    ServerState,
)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a port in use fails in a second)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        from aigc_cli.core.errors import UsageError

        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def serve(options: ServerOptions, log: Callable[[str], None]) -> int:
    """Serve until SIGTERM or Ctrl-C; returns the exit code (3 when the model cannot load)."""
    import uvicorn

    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    state = ServerState(options, log)
    if options.host not in LOOPBACK and options.api_key is None:
        log(f"aigc serve: warning: listening on {options.host} without an API key: anyone who can reach it can use it (--api-key)")
    config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    server = uvicorn.Server(config)
    state.server = server
    shown = f"[{host}]" if ":" in host else host
    log(f"aigc serve: listening on http://{shown}:{port} (OpenAI API under /v1); loading {options.spec.name}...")
    # uvicorn re-raises the signal it caught once it has shut down; a handler that does nothing
    # lets SIGTERM end the process with 0 after the graceful shutdown.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stderr.flush()
    return state.exit_code
