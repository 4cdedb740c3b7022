"""Options shared by the commands, defined once: the model options, the output format, and the
generation settings, whose options are derived from the settings registry (`with_settings`)."""

from __future__ import annotations

import functools
import inspect
import signal
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Optional, TypeVar

import typer

from aigc_cli.core.errors import UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.core.settings import MAX_BATCH, SETTINGS, Decoding, GenerationSettings, Setting
from aigc_cli.frontends.cli.render import Messages, OutputFormat

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 runtime failure; 2 usage error (bad flag, empty prompt); "
    "3 model unavailable (not found, offline, corrupt); 4 some records failed (batch files); "
    "130 interrupted."
)
_MODEL_HELP = (
    "Hugging Face model id (downloaded once, then cached) or a local model directory. "
    "'tiny-random' is a built-in tiny random GPT-2 for smoke tests: it needs no download "
    "and its output is gibberish by design."
)
ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="AIGC_MODEL", help=_MODEL_HELP, metavar="NAME|DIR")]
# generate: no default, so that with --server the server's model is used unless one is named
GenerateModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", envvar="AIGC_MODEL", help=_MODEL_HELP + " Default: gpt2 (with --server: the server's).", metavar="NAME|DIR",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.", metavar="auto|cpu|cuda|mps")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16/float16 on GPU), float32, float16 or bfloat16.", metavar="auto|float32|float16|bfloat16")
]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        help="Fast mode on CPU for GPT-2 checkpoints: int8 (int8 weights, activations quantized on "
        "the fly) or fp16 (float16 weight storage). Slightly different outputs; none (default) is exact.",
        metavar="none|int8|fp16",
    ),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="auto (rich on a terminal, plain otherwise), rich, plain or jsonl.")]
DebugOpt = Annotated[bool, typer.Option("--debug", envvar="AIGC_DEBUG", help="Show tracebacks of errors.")]


def model_spec(model: str | None, device: str, dtype: str, quantize: str = "none") -> ModelSpec:
    """The model options, parsed once (exit 2 naming the flag)."""
    return ModelSpec.parse(model, device, dtype, quantize)


def with_model(quantize: bool = True, fmt: bool = True, named: bool = False) -> Callable[[F], F]:
    """Give a command the model options (--model, --device, --dtype, and --quantize, --format,
    --debug); it receives them parsed as `spec: ModelSpec` (and `output_format`). With `named`,
    --model has no default and the command also gets `named_model` (None when not given: with
    --server, the server's model)."""
    added = [
        ("model", GenerateModelOpt if named else ModelOpt, None if named else "gpt2"),
        ("device", DeviceOpt, "auto"),
        ("dtype", DtypeOpt, "auto"),
        *([("quantize", QuantizeOpt, "none")] if quantize else []),
        *([("output_format", FormatOpt, OutputFormat.auto)] if fmt else []),
        ("debug", DebugOpt, False),
    ]

    def decorate(command: F) -> F:
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name not in ("spec", "named_model", *(name for name, _, _ in added))
        ]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in added]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            model = kwargs.pop("model")
            spec = ModelSpec.parse(model, kwargs.pop("device"), kwargs.pop("dtype"), kwargs.pop("quantize", "none"))
            kwargs.pop("debug")  # read by the error boundary
            if named:
                kwargs["named_model"] = model
            return command(spec=spec, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def load_engine(spec: ModelSpec, messages: Messages) -> Any:
    """The one model load of the process, with a spinner on a terminal."""
    from aigc_cli.engine.engine import Engine

    with messages.status(f"Loading {spec.name}..."):
        return Engine.load(spec)


# -- generation settings from the registry ---------------------------------------------------------


def _option(setting: Setting, help: str | None, choices: type[Any] | None) -> tuple[Any, Any]:
    """(annotation, default) of a setting's Typer option."""
    names = [n for n in (setting.flag, setting.short) if n is not None]
    text = help or setting.help
    if setting.kind == "bool":
        base = setting.flag.removeprefix("--") if setting.flag else setting.name
        return Annotated[bool, typer.Option(f"--{base}/--no-{base}", help=text)], setting.default
    kind: Any = {"int": int, "float": float, "choice": choices or Decoding, "texts": list[str], "ids": list[int]}[setting.kind]
    if setting.kind in ("texts", "ids") or setting.optional:
        kind = Optional[kind]
    default = None if setting.kind in ("texts", "ids") else setting.default
    if choices is not None:
        default = choices(setting.default.value)
    return Annotated[kind, typer.Option(*names, help=text, metavar=setting.metavar)], default


def with_settings(*names: str, help: dict[str, str] | None = None, choices: dict[str, type[Any]] | None = None) -> Callable[[F], F]:
    """Give a command the registry's options for these settings; it receives them as one
    unresolved `settings: GenerationSettings` argument. `help` and `choices` narrow a setting
    for one command (poem's decodings)."""

    def decorate(command: F) -> F:
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != "settings"]
        added = []
        for name in names:
            annotation, default = _option(SETTINGS[name], (help or {}).get(name), (choices or {}).get(name))
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        arguments = [p for p in own if p.default is inspect.Parameter.empty or _is_argument(p)]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in arguments]
        arguments = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in arguments]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            kwargs["settings"] = settings_from_cli({name: kwargs.pop(name) for name in names})
            return command(**kwargs)

        params = [*arguments, *added, *rest]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def _is_argument(param: inspect.Parameter) -> bool:
    return any(isinstance(meta, typer.models.ArgumentInfo) for meta in getattr(param.annotation, "__metadata__", ()))


def settings_from_cli(values: dict[str, Any]) -> GenerationSettings:
    """Typed option values as unresolved settings: repeatable options become tuples, an enum
    narrowed for one command becomes the Decoding it names, --stop reads its escapes."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        setting = SETTINGS[name]
        if setting.kind in ("texts", "ids"):
            value = tuple(setting.cli_convert(v) if setting.cli_convert else v for v in value or ())
        elif setting.kind == "choice" and value is not None:
            value = Decoding(value.value)
        out[name] = value
    return GenerationSettings(**out)


# -- small shared readers ---------------------------------------------------------------------------


def batch_size(text: str) -> int | None:
    """--batch-size N|auto (None: auto)."""
    if text == "auto":
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH:
        raise UsageError(f"--batch-size: an integer from 1 to {MAX_BATCH}, or auto (got {text!r})")
    return int(text)


def check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UsageError(f"{flag}: must be from {low} to {high} (got {value})")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the job like Ctrl-C: what is complete stays written, the exit code is 130."""

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread (some test runners)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
