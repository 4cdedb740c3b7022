"""The Typer app: the commands (one module each), the one error boundary, and the console script."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, TypeVar

import typer

from aigc_cli import __version__
from aigc_cli.core.errors import AigcError, ExitCode
from aigc_cli.frontends.cli import finetune, generate, info, poem, recommend, score, serve, stats
from aigc_cli.frontends.cli.options import EXIT_CODES_HELP
from aigc_cli.frontends.cli.render import Messages, Streams

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="aigc",
    help=f"Text generation with GPT-2 from the command line.\n\n{EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def boundary(command: F) -> F:
    """The one error boundary: AigcError -> one line on stderr and its exit code; Ctrl-C -> 130;
    anything else -> one line and exit 1 (`--debug` or AIGC_DEBUG=1 shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("AIGC_DEBUG", "") not in ("", "0")
        messages = Messages(Streams())
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except AigcError as exc:
            if debug:
                raise
            messages.error(exc.message, exc.hint)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            messages.error("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except BrokenPipeError:
            _silence_broken_pipe()
            raise typer.Exit(int(ExitCode.OK)) from None
        except Exception as exc:
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            messages.error(f"{type(exc).__name__}: {first} (run with --debug for the traceback)")
            raise typer.Exit(int(ExitCode.FAILURE)) from None

    return wrapper  # type: ignore[return-value]


for _module in (generate, poem, score, recommend, stats, serve, finetune, info):
    _name = _module.__name__.rsplit(".", 1)[1]
    app.command(name=_name, epilog=_module.EPILOG)(boundary(_module.command))


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False) -> None:
    if version:
        typer.echo(f"aigc {__version__}")
        raise typer.Exit()


def _silence_broken_pipe() -> None:
    """The reader went away (`| head`): point stdout at devnull so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """The console script: run the app, then leave without the interpreter's teardown of torch
    (about half a second), once everything is flushed."""
    try:
        app(prog_name="aigc")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            _silence_broken_pipe()
    os._exit(code)
