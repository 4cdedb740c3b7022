"""`aigc serve`: check the flags, then hand over to the server's start-up (frontends.server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aigc_cli.core.errors import UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, Streams

EPILOG = (
    "Examples:\n\n"
    "  aigc serve --model gpt2 --port 8000\n\n"
    "  AIGC_API_KEY=secret aigc serve --host 0.0.0.0 --metrics\n\n"
    "  aigc generate \"Hello, how are you?\" -n 5 --server http://127.0.0.1:8000\n\n"
    "Endpoints: POST /v1/completions, GET /v1/models, POST /tokenize, GET /health, GET /metrics "
    "(with --metrics). Needs the server extra: pip install \"aigc[serve]\".\n\n"
    f"{o.EXIT_CODES_HELP}"
)


@o.with_model(fmt=False)
def command(
    spec: ModelSpec,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable by others.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, printed on stderr).")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="AIGC_API_KEY", help="Require 'Authorization: Bearer KEY' on every request but /health and /metrics.", metavar="KEY")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait for a slot; beyond that requests get 503 with Retry-After.")] = 256,
    batch_size: Annotated[
        str, typer.Option(help="Sequences decoded together, or auto: up to 64, on CPU fewer when their KV cache would pass 1 GiB.", metavar="N|auto")
    ] = "auto",
    metrics: Annotated[bool, typer.Option(help="Serve Prometheus metrics at /metrics.")] = False,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; larger ones get 413.")] = 4 << 20,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds SIGTERM or Ctrl-C lets requests in flight finish; then they end with an error the client sees.")
    ] = 10.0,
    chat_template: Annotated[
        Optional[str],
        typer.Option(help="A Jinja chat template (messages -> prompt) that enables /v1/chat/completions; GPT-2 has none of its own.", metavar="FILE"),
    ] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions), until SIGTERM or Ctrl-C."""
    o.check_range("--port", port, 0, 65535)
    if max_queue < 0:
        raise UsageError(f"--max-queue: must be 0 or more (got {max_queue})")
    o.check_range("--max-body", max_body, 1024, 1 << 30)
    if not 0 <= shutdown_timeout <= 86400:
        raise UsageError(f"--shutdown-timeout: must be from 0 to 86400 seconds (got {shutdown_timeout})")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key: must not be empty")
    try:
        import fastapi  # noqa: F401 - the server extra, checked before anything starts
        import uvicorn  # noqa: F401

        from aigc_cli.frontends.server.startup import ServerOptions, serve
    except ImportError as exc:
        raise UsageError(f'aigc serve needs the server extra ({exc.name} is missing): pip install "aigc[serve]"') from None
    template = _chat_template(chat_template) if chat_template is not None else None
    options = ServerOptions(
        spec=spec, host=host, port=port, api_key=api_key, max_queue=max_queue, batch_size=o.batch_size(batch_size), metrics=metrics,
        chat_template=template, max_body=max_body, shutdown_timeout=shutdown_timeout,
    )
    messages = Messages(Streams())
    code = serve(options, messages.info)
    if code:
        raise typer.Exit(code)


def _chat_template(path: str) -> str:
    """The template's text, parsed once now so that a broken one is a usage error, not a 500 later."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise UsageError(f"--chat-template {path}: line {exc.lineno}: {exc.message}") from None
    return text
