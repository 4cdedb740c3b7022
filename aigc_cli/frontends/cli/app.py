"""The Typer app: commands, shared option aliases, and the one error boundary."""

from __future__ import annotations

import functools
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from aigc_cli import __version__
from aigc_cli.jobs.records import InputFormat, count_lines, load_template, parse_shard, read_records, records_from_args
from aigc_cli.core.errors import AigcError, ExitCode, UsageError
from aigc_cli.frontends.cli.render import (
    Messages,
    OutputFormat,
    SequenceRenderer,
    Streams,
    render_poems,
    render_rows,
)
from aigc_cli.jobs.pipeline import GenerateJob, GeneratePipeline
from aigc_cli.apps.recommend import Aggregate, ScoreKind
from aigc_cli.core.settings import MAX_BATCH, Decoding, GenerationSettings
from aigc_cli.core.textrules import unescape

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 runtime failure; 2 usage error (bad flag, empty prompt); "
    "3 model unavailable (not found, offline, corrupt); 4 some records failed (batch files); "
    "130 interrupted."
)

app = typer.Typer(
    name="aigc",
    help=f"Text generation with GPT-2 from the command line.\n\n{EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

# Shared option aliases, defined once.
_MODEL_HELP = (
    "Hugging Face model id (downloaded once, then cached) or a local model directory. "
    "'tiny-random' is a built-in tiny random GPT-2 for smoke tests: it needs no download "
    "and its output is gibberish by design."
)
ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="AIGC_MODEL", help=_MODEL_HELP, metavar="NAME|DIR")]
# generate: no default, so that with --server the server's model is used unless one is named
GenerateModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="AIGC_MODEL", help=_MODEL_HELP + " Default: gpt2 (with --server: the server's).", metavar="NAME|DIR", show_default=False),
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
FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", help="auto (rich on a terminal, plain otherwise), rich, plain or jsonl."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", envvar="AIGC_DEBUG", help="Show tracebacks of errors.")]

_DEVICES = ("auto", "cpu", "cuda", "mps")
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_QUANTIZE = ("none", "int8", "fp16")
MAX_CANDIDATES = 256

F = TypeVar("F", bound=Callable[..., Any])


class RhymeBook(str, Enum):
    xinyun = "xinyun"
    pingshui = "pingshui"


class Backend(str, Enum):
    local = "local"
    ray = "ray"


class PoemDecoding(str, Enum):
    """The decodings a constrained poem can use (greedy has one answer, contrastive ignores the form's ranking)."""

    sample = "sample"
    beam = "beam"


def _boundary(command: F) -> F:
    """The one error boundary: AigcError -> one line on stderr and its exit code; Ctrl-C -> 130."""

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


def _silence_broken_pipe() -> None:
    """The reader went away (`| head`): point stdout at devnull so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _check_device(device: str, dtype: str, quantize: str = "none") -> None:
    """Validate --device, --dtype and --quantize up front, before anything slow happens."""
    for value, allowed, flag in ((device, _DEVICES, "--device"), (dtype, _DTYPES, "--dtype"), (quantize, _QUANTIZE, "--quantize")):
        if value not in allowed:
            raise UsageError(f"{flag}: must be one of {', '.join(allowed)} (got {value!r})")


def _load_engine(model: str, device: str, dtype: str, quantize: str, messages: Messages) -> Any:
    """The one model load of the process, with a spinner on a terminal."""
    from aigc_cli.engine.engine import Engine

    with messages.status(f"Loading {model}..."):
        return Engine.load(model, device=device, dtype=dtype, quantize=quantize)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"aigc {__version__}")
        raise typer.Exit()


@app.command(
    epilog="Examples:\n\n"
    "  aigc generate \"Hello, how are you?\" -n 5\n\n"
    "  aigc generate \"Once upon a time\" --decoding beam --num-beams 5 -n 2\n\n"
    "  aigc generate \"The news today:\" --stop \"\\n\" --ban weather --format jsonl\n\n"
    "  aigc generate -f prompts.txt -o out.jsonl --seed 1     (then add --resume after an interruption)\n\n"
    "  cat prompts.jsonl | aigc generate - --shard 0/4 > part0.jsonl\n\n"
    f"{EXIT_CODES_HELP}"
)
@_boundary
def generate(
    prompts: Annotated[
        Optional[list[str]], typer.Argument(help="One or more prompts; '-' reads prompts from stdin.", show_default=False, metavar="PROMPT...")
    ] = None,
    num_sequences: Annotated[int, typer.Option("--num-sequences", "-n", help="Sequences per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens at most (the prompt is not counted).")] = 50,
    min_new_tokens: Annotated[int, typer.Option(help="New tokens at least before EOS may end a sequence.")] = 0,
    decoding: Annotated[Decoding, typer.Option(help="sample, greedy, beam or contrastive.")] = Decoding.sample,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 means greedy.")] = 1.0,
    top_k: Annotated[
        Optional[int], typer.Option(help="Keep the k most likely tokens (sample: default 50, 0 = off; contrastive: default 4).")
    ] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set with this much probability.")] = 1.0,
    typical_p: Annotated[float, typer.Option(help="Locally typical sampling mass (1 = off).")] = 1.0,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p times the top probability.")] = None,
    num_beams: Annotated[Optional[int], typer.Option(help="Beams for --decoding beam (default max(4, -n)).")] = None,
    length_penalty: Annotated[float, typer.Option(help="Beam search: >1 favours longer sequences.")] = 1.0,
    early_stopping: Annotated[bool, typer.Option(help="Beam search: stop once -n beams are finished.")] = False,
    penalty_alpha: Annotated[float, typer.Option(help="Contrastive search degeneration penalty (0 = greedy).")] = 0.6,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already present (1 = off).")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Never repeat an n-gram of this size (0 = off).")] = 0,
    stop: Annotated[
        Optional[list[str]],
        typer.Option(help="End the output before this text (repeatable); \\n, \\t, \\r, \\\\, \\xHH and \\uHHHH are read as escapes.", metavar="TEXT"),
    ] = None,
    ban: Annotated[Optional[list[str]], typer.Option(help="Never generate this word, any case (repeatable).", metavar="WORD")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed and settings give the same output.")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read prompts from this file ('-' for stdin).", metavar="FILE")] = None,
    input_format: Annotated[
        InputFormat, typer.Option(help="auto (JSONL if the first line is a JSON object), lines or jsonl.")
    ] = InputFormat.auto,
    template: Annotated[Optional[str], typer.Option(help="Render each input record into this $field template.", metavar="FILE")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write JSONL records to this file (never one of the inputs; one run at a time).", metavar="FILE")] = None,
    resume: Annotated[bool, typer.Option(help="With -o: skip records the file already holds, append the rest.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad input record instead of writing an error record.")] = False,
    batch_size: Annotated[
        str,
        typer.Option(help="Rows decoded together, or auto: up to 64, on CPU fewer when their KV cache would pass 1 GiB.", metavar="N|auto"),
    ] = "auto",
    shard: Annotated[Optional[str], typer.Option(help="i/N: process only records i, i+N, i+2N, ... (0-based).", metavar="i/N")] = None,
    deterministic: Annotated[
        bool, typer.Option(help="Generate each sequence alone: sampled output then never depends on batch mates.")
    ] = False,
    server: Annotated[
        Optional[str],
        typer.Option(envvar="AIGC_SERVER", help="Generate on a running 'aigc serve' at this URL instead of loading the model here.", metavar="URL"),
    ] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="AIGC_API_KEY", help="The server's API key (with --server).", metavar="KEY")] = None,
    backend: Annotated[
        Backend, typer.Option(help="local (this process) or ray (actors on a Ray cluster; pip install \"aigc[ray]\").")
    ] = Backend.local,
    ray_address: Annotated[
        Optional[str], typer.Option(help="With --backend ray: the cluster to join (default: RAY_ADDRESS, else a local instance).", metavar="ADDRESS")
    ] = None,
    workers: Annotated[int, typer.Option(help="With --backend ray: actors, each loading the model once.")] = 2,
    worker_cpus: Annotated[float, typer.Option(help="With --backend ray: CPUs per actor.")] = 1.0,
    worker_gpus: Annotated[float, typer.Option(help="With --backend ray: GPUs per actor.")] = 0.0,
    model: GenerateModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    output_format: FormatOpt = OutputFormat.auto,
    debug: DebugOpt = False,
) -> None:
    """Generate N numbered continuations of each prompt (arguments, a file, or stdin)."""
    streams = Streams()
    messages = Messages(streams)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        decoding=decoding,
        num_sequences=num_sequences,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        min_p=min_p,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        penalty_alpha=penalty_alpha,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        stop=tuple(unescape(text) for text in stop or ()),
        ban=tuple(ban or ()),
        seed=seed,
    ).resolved()
    _check_device(device, dtype, quantize)
    source = _prompt_source(prompts, file, streams)
    if template is not None and source.kind == "args":
        raise UsageError("--template: renders records of -f FILE or stdin, not prompt arguments")
    if resume and output is None:
        raise UsageError("--resume: needs -o/--output FILE (the file to continue)")
    shard_spec = parse_shard(shard) if shard is not None else None
    batch = 1 if deterministic else _batch_size(batch_size)
    tmpl = load_template(template) if template is not None else None
    fmt = OutputFormat.jsonl if output is not None or (source.kind != "args" and output_format is OutputFormat.auto) else output_format

    if server is not None and (device, dtype, quantize) != ("auto", "auto", "none"):
        raise UsageError("--device, --dtype and --quantize: set them where the server runs (aigc serve), not with --server")

    if backend is Backend.ray:
        if server is not None:
            raise UsageError("--backend ray: generates on a Ray cluster; --server on a running aigc serve: choose one")
        if workers < 1 or worker_cpus <= 0 or worker_gpus < 0:
            raise UsageError(f"--workers must be at least 1 and --worker-cpus above 0 (got {workers}, {worker_cpus})")
        from aigc_cli.frontends.ray_backend import import_ray

        import_ray()  # the missing extra is a usage error before anything is opened
    elif (ray_address, workers, worker_cpus, worker_gpus) != (None, 2, 1.0, 0.0):
        raise UsageError("--ray-address, --workers, --worker-cpus and --worker-gpus: only with --backend ray")

    def load() -> Any:
        if server is not None:
            from aigc_cli.frontends.client import RemoteEngine

            return RemoteEngine.connect(server, api_key, model)
        if backend is Backend.ray:
            from aigc_cli.frontends.ray_backend import RayEngine

            with messages.status(f"Starting {workers} Ray workers with {model or 'gpt2'}..."):
                return RayEngine(model or "gpt2", device, dtype, quantize, ray_address, workers, worker_cpus, worker_gpus)
        return _load_engine(model or "gpt2", device, dtype, quantize, messages)

    def make_emit(out: Any, final: GenerationSettings) -> tuple[Any, Any]:
        out_streams = Streams(stdout=out if out is not None else streams.stdout, stderr=streams.stderr)
        renderer = SequenceRenderer(out_streams, fmt, multi_prompt=source.many)
        lone = source.kind == "args" and len(source.prompts) * final.num_sequences == 1
        on_text = (lambda c, text: renderer.stream(c, text, final.stop)) if lone and renderer.can_stream else None
        emit = lambda item: renderer.error_record(item, messages) if isinstance(item, dict) else renderer.completion(item)  # noqa: E731
        return emit, on_text

    job = GenerateJob(
        records=lambda: source.records(tmpl, input_format),
        settings=settings,
        output=output,
        inputs=[*([source.path or ""] if source.kind == "file" else [0] if source.kind == "stdin" else []), *([template] if template else [])],
        resume=resume,
        shard=shard_spec,
        batch_size=batch,
        strict=strict or source.kind == "args",
        provenance=fmt is OutputFormat.jsonl,
    )
    pipeline = GeneratePipeline(job)
    try:
        # The bar is for file and stdin jobs; prompts given as arguments are shown (or streamed) directly.
        bar = messages.progress(source.total) if source.kind != "args" else nullcontext(lambda done, tokens: None)
        with _terminate_as_interrupt(), bar as update:
            summary = pipeline.run(load, make_emit, on_progress=lambda s: update(s.records, s.tokens))
    except KeyboardInterrupt:
        done = pipeline.summary.records
        if output is not None:
            hint = f"rerun the same command with --resume to continue from {output}"
            messages.error(f"interrupted after {done} records ({pipeline.summary.sequences} sequences written to {output}); {hint}")
        else:
            messages.error(f"interrupted after {done} records")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if summary.errors:
        messages.warn(f"{summary.errors} of {summary.records} records could not be processed (see their error records)")
        raise typer.Exit(int(ExitCode.PARTIAL))


class _Source:
    """Where prompts come from: arguments, a file or stdin."""

    def __init__(self, kind: str, prompts: list[str] | None = None, path: str | None = None) -> None:
        self.kind, self.prompts, self.path = kind, prompts or [], path

    @property
    def many(self) -> bool:
        return self.kind != "args" or len(self.prompts) > 1

    @property
    def total(self) -> int | None:
        return count_lines(self.path) if self.kind == "file" and self.path is not None else None

    def records(self, template: Any, input_format: InputFormat) -> Iterator[Any]:
        if self.kind == "args":
            yield from records_from_args(self.prompts)
        elif self.kind == "stdin":
            yield from read_records(sys.stdin.buffer, input_format, template)
        else:
            with open(self.path, "rb") as raw:  # type: ignore[arg-type]
                yield from read_records(raw, input_format, template)


def _prompt_source(prompts: list[str] | None, file: str | None, streams: Streams) -> _Source:
    """Arguments, -f FILE, '-' or a piped stdin; stdin is read only when asked or when nothing else was given."""
    prompts = prompts or []
    if file is not None:
        if prompts:
            raise UsageError("-f/--file: give prompts either as arguments or in a file, not both")
        if file == "-":
            return _Source("stdin")
        if not os.path.isfile(file):
            raise UsageError(f"-f/--file {file}: " + ("is a directory" if os.path.isdir(file) else "no such file"))
        return _Source("file", path=file)
    if prompts == ["-"]:
        return _Source("stdin")
    if "-" in prompts:
        raise UsageError("'-' (read stdin) cannot be mixed with prompt arguments")
    if not prompts:
        if _stdin_is_terminal():
            raise UsageError("no prompt given: pass prompts as arguments, -f FILE, or pipe them to stdin")
        return _Source("stdin")
    for i, p in enumerate(prompts):
        if p == "" or p.isspace():
            raise UsageError(f"prompt {i + 1} is empty")
    return _Source("args", prompts=prompts)


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True


def _batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH:
        raise UsageError(f"--batch-size: an integer from 1 to {MAX_BATCH}, or auto (got {text!r})")
    return int(text)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
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


@app.command(
    epilog="Examples:\n\n"
    "  aigc score essay.txt\n\n"
    "  cat sentences.txt | aigc score - --per-line --format jsonl\n\n"
    f"{EXIT_CODES_HELP}"
)
@_boundary
def score(
    path: Annotated[str, typer.Argument(help="Text file to score, or '-' for stdin.", show_default=False, metavar="FILE")],
    per_line: Annotated[bool, typer.Option(help="Score each non-empty line on its own.")] = False,
    stride: Annotated[
        Optional[int], typer.Option(help="Sliding-window stride for texts longer than the context (default: half of it).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    model: ModelOpt = "gpt2",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    output_format: FormatOpt = OutputFormat.auto,
    debug: DebugOpt = False,
) -> None:
    """Perplexity, mean negative log-likelihood and token count of a text under the model.

    Every token is scored, the first one conditioned on the model's BOS token (<|endoftext|> for
    GPT-2); texts longer than the context use a sliding window.
    """
    _check_device(device, dtype, quantize)
    if stride is not None and stride < 1:
        raise UsageError(f"--stride: must be at least 1 (got {stride})")
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size: must be from 1 to {MAX_BATCH} (got {batch_size})")
    text = _read_text(path)
    streams = Streams()
    from aigc_cli.engine.scoring import score_text

    engine = _load_engine(model, device, dtype, quantize, Messages(streams))
    if stride is not None and stride > engine.context_length:
        raise UsageError(f"--stride: must not exceed the model's context of {engine.context_length} (got {stride})")
    with Messages(streams).progress(None, unit="windows") as update:
        rows = score_text(engine, text, path, per_line, stride, batch_size, on_progress=update)
    columns = (["line"] if per_line else []) + ["perplexity", "nll", "tokens"]
    render_rows(streams, output_format, columns, rows, title=None)


def _read_text(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


@app.command(
    epilog="Examples:\n\n"
    "  aigc recommend sports technology --catalog sample -k 5\n\n"
    "  aigc recommend --profile me.json --catalog news.tsv --explain\n\n"
    "  aigc recommend --catalog sample --eval sample\n\n"
    "  aigc recommend cooking travel --per-interest 3      (no catalog: generated ideas)\n\n"
    f"{EXIT_CODES_HELP}"
)
@_boundary
def recommend(
    interests: Annotated[Optional[list[str]], typer.Argument(help="The user's interests.", show_default=False, metavar="INTEREST...")] = None,
    profile: Annotated[
        Optional[str], typer.Option(help="JSON user profile: interests, liked and disliked item titles or ids.", metavar="FILE")
    ] = None,
    catalog: Annotated[
        Optional[str],
        typer.Option(help="Items to rank: JSONL, CSV or TSV with id,title[,description,category], MIND news.tsv, or 'sample'."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top", help="How many items to show.")] = 10,
    score_kind: Annotated[
        ScoreKind, typer.Option("--score", help="pmi (log P(item|user) - log P(item|neutral)), loglik or mean (per token).")
    ] = ScoreKind.pmi,
    aggregate: Annotated[Aggregate, typer.Option(help="Combine interests by max or mean.")] = Aggregate.max,
    explain: Annotated[bool, typer.Option(help="Show each interest's score.")] = False,
    template: Annotated[Optional[str], typer.Option(help="User prompt template with $interests.", metavar="FILE")] = None,
    neutral_template: Annotated[Optional[str], typer.Option(help="Neutral prompt for PMI.", metavar="FILE")] = None,
    per_interest: Annotated[int, typer.Option(help="Without --catalog: generated ideas per interest.")] = 3,
    eval_path: Annotated[
        Optional[str],
        typer.Option("--eval", help="Evaluate on users (JSONL or MIND behaviors.tsv, or 'sample'): HR@k, nDCG@k, MRR, AUC."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="(prompt, item) pairs per forward pass.")] = 16,
    seed: Annotated[Optional[int], typer.Option(help="Seed for generated ideas.")] = None,
    model: ModelOpt = "gpt2",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    output_format: FormatOpt = OutputFormat.auto,
    debug: DebugOpt = False,
) -> None:
    """Rank a catalog for a user's interests with the language model (zero-shot), or suggest ideas."""
    from aigc_cli.apps import recommend as rec

    _check_device(device, dtype, quantize)
    if k < 1:
        raise UsageError(f"-k: must be at least 1 (got {k})")
    if not 1 <= per_interest <= 100:
        raise UsageError(f"--per-interest: must be from 1 to 100 (got {per_interest})")
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size: must be from 1 to {MAX_BATCH} (got {batch_size})")
    if eval_path is not None and catalog is None:
        raise UsageError("--eval: needs --catalog (the items the users' candidates refer to)")
    user = rec.load_profile(profile) if profile else rec.Profile()
    user.interests += interests or []
    items = rec.load_catalog(catalog) if catalog else None
    users = rec.load_eval(eval_path) if eval_path else None
    prompts = rec.Prompts.load(template, neutral_template)
    if users is None and not user.interests and not (items and user.liked):
        raise UsageError("no user: give interests as arguments, or --profile FILE with interests or liked items")
    streams = Streams()
    engine = _load_engine(model, device, dtype, quantize, Messages(streams))
    if users is not None and items is not None:
        ours, baseline = rec.evaluate(engine, items, users, prompts, k, score_kind, aggregate, batch_size)
        rows = [{"ranking": f"aigc ({score_kind.value})", **ours}, {"ranking": "random", **baseline}]
        render_rows(streams, output_format, list(rows[0]), rows, title=f"{len(users)} users, k={k}")
    elif items is not None:
        ranked = rec.rank(engine, items, user, prompts, score_kind, aggregate, batch_size)[:k]
        rows = [
            {"rank": n, "id": r.item.id, "title": r.item.title, "score": r.score, "per_interest": r.per_context}
            for n, r in enumerate(ranked, start=1)
        ]
        columns = ["rank", "id", "title", "score"] + (["per_interest"] if explain else [])
        render_rows(streams, output_format, columns, rows, title=f"Top {len(rows)} for {', '.join(user.interests) or 'your liked items'}")
    else:
        rows = rec.ideas(engine, user.interests, per_interest, seed)
        render_rows(streams, output_format, ["interest", "idea"], rows, title="Generated ideas (not real items)")


@app.command(
    epilog="Examples:\n\n"
    "  aigc poem \"the sea at night\" --form haiku -n 2 --annotate\n\n"
    "  aigc poem autumn --form sonnet --candidates 4\n\n"
    "  aigc poem 春天 --form qijue --acrostic 春夏秋冬 --model uer/gpt2-chinese-poem\n\n"
    "  aigc poem --check my_haiku.txt --form haiku\n\n"
    "Forms: free, haiku, tanka, limerick, couplet, quatrain, sonnet (English); wujue, qijue, wulv, qilv (Chinese).\n\n"
    f"{EXIT_CODES_HELP} With --check: 0 the poem fits, 1 it does not."
)
@_boundary
def poem(
    topic: Annotated[Optional[str], typer.Argument(help="What the poem is about.", show_default=False, metavar="TOPIC")] = None,
    form_name: Annotated[
        Optional[str], typer.Option("--form", help="Poem form (default: haiku, or wujue for a Chinese topic).", metavar="FORM")
    ] = None,
    num_sequences: Annotated[int, typer.Option("--num-sequences", "-n", help="Poems to print.")] = 1,
    candidates: Annotated[
        Optional[int], typer.Option(help="Constrained poems to sample; the best -n by the model's own score are kept (default max(4, -n)).")
    ] = None,
    lines: Annotated[Optional[int], typer.Option(help="Lines (free form).")] = None,
    syllables: Annotated[Optional[str], typer.Option(help="Syllables per line, e.g. 5,7,5 or 8-9 for all lines.", metavar="N,N,...")] = None,
    rhyme_scheme: Annotated[Optional[str], typer.Option(help="Rhyme scheme, e.g. ABAB ('.' for an unrhymed line).", metavar="SCHEME")] = None,
    acrostic: Annotated[Optional[str], typer.Option(help="Chinese forms: each line starts with the next character (藏头诗).", metavar="CHARS")] = None,
    rhymes: Annotated[
        RhymeBook,
        typer.Option(help="Chinese rhyme book: xinyun (中华新韵, modern pinyin) or pingshui (平水韵, classical poems)."),
    ] = RhymeBook.xinyun,
    annotate: Annotated[bool, typer.Option(help="Show syllables or characters per line and the rhyme key.")] = False,
    template: Annotated[Optional[str], typer.Option(help="Prompt template with $topic and $form.", metavar="FILE")] = None,
    check_path: Annotated[
        Optional[str], typer.Option("--check", help="Check an existing poem (file or '-') against --form instead of writing one.", metavar="FILE")
    ] = None,
    decoding: Annotated[PoemDecoding, typer.Option(help="sample (the candidates are sampled) or beam.")] = PoemDecoding.sample,
    num_beams: Annotated[Optional[int], typer.Option(help="Beams for --decoding beam.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely allowed tokens (default 50).")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise repeated tokens (1 = off).")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Never repeat an n-gram of this size (0 = off).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    model: ModelOpt = "gpt2",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    output_format: FormatOpt = OutputFormat.auto,
    debug: DebugOpt = False,
) -> None:
    """Write poems whose form (lines, syllables, rhyme) is guaranteed by constrained decoding."""
    from aigc_cli.apps.poetics import check, has_cjk, resolve_form

    if form_name is None:
        form_name = "wujue" if topic and has_cjk(topic) else "haiku"
    form = resolve_form(form_name, syllables, rhyme_scheme, lines)
    if acrostic is not None and (form.language != "zh" or len(acrostic) != form.lines):
        raise UsageError(f"--acrostic: needs a Chinese form and one character per line ({form.lines} for {form.name})")
    streams = Streams()
    if check_path is not None:
        report = check(_read_text(check_path), form, acrostic, rhymes.value)
        rows = [
            {"line": n, "text": r.text, "count": r.count, "rhyme": r.rhyme, "estimated": list(r.estimated)}
            for n, r in enumerate(report.lines, start=1)
        ]
        columns = ["line", "text", "count", "rhyme"] + (["estimated"] if annotate else [])
        render_rows(streams, output_format, columns, rows, title=f"{form.name}: " + ("fits" if report.ok else "does not fit"))
        for problem in report.problems:
            Messages(streams).error(problem)
        raise typer.Exit(0 if report.ok else 1)
    if not topic or not topic.strip():
        raise UsageError("no topic: aigc poem TOPIC --form FORM (or --check FILE)")
    candidates = candidates if candidates is not None else max(4, num_sequences)
    if candidates < num_sequences:
        raise UsageError(f"--candidates ({candidates}) must be at least -n ({num_sequences})")
    if candidates > MAX_CANDIDATES:
        raise UsageError(f"--candidates: at most {MAX_CANDIDATES} (got {candidates})")
    settings = GenerationSettings(
        decoding=Decoding(decoding.value),
        num_sequences=num_sequences,
        num_beams=num_beams,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        seed=seed if seed is not None else secrets.randbelow(2**31),
    ).resolved()
    _check_device(device, dtype, quantize)
    from aigc_cli.apps.prompts import load_prompt

    prompt_template = load_prompt(template or f"poem-{form.language}.txt", "--template")
    from aigc_cli.apps.poem import write_poems

    engine = _load_engine(model, device, dtype, quantize, Messages(streams))
    poems = write_poems(engine, topic, form, settings, candidates, prompt_template, acrostic, rhymes.value)
    render_poems(
        streams, output_format, poems, f"{form.name} on {topic}", annotate, {"model": engine.name, "form": form.name, "topic": topic}
    )


@app.command(
    epilog="Examples:\n\n"
    "  aigc serve --model gpt2 --port 8000\n\n"
    "  AIGC_API_KEY=secret aigc serve --host 0.0.0.0 --metrics\n\n"
    "  aigc generate \"Hello, how are you?\" -n 5 --server http://127.0.0.1:8000\n\n"
    "Endpoints: POST /v1/completions, GET /v1/models, POST /tokenize, GET /health, GET /metrics "
    "(with --metrics). Needs the server extra: pip install \"aigc[serve]\".\n\n"
    f"{EXIT_CODES_HELP}"
)
@_boundary
def serve(
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
    chat_template: Annotated[
        Optional[str],
        typer.Option(help="A Jinja chat template (messages -> prompt) that enables /v1/chat/completions; GPT-2 has none of its own.", metavar="FILE"),
    ] = None,
    model: ModelOpt = "gpt2",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    debug: DebugOpt = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions), until SIGTERM or Ctrl-C."""
    _check_device(device, dtype, quantize)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port: must be from 0 to 65535 (got {port})")
    if max_queue < 0:
        raise UsageError(f"--max-queue: must be 0 or more (got {max_queue})")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key: must not be empty")
    try:
        from aigc_cli.frontends.server.app import ServerOptions, serve as run_server
    except ImportError as exc:
        raise UsageError(f'aigc serve needs the server extra ({exc.name} is missing): pip install "aigc[serve]"') from None
    messages = Messages(Streams())
    template = None
    if chat_template is not None:
        try:
            template = Path(chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--chat-template {chat_template}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(template)
        except TemplateSyntaxError as exc:
            raise UsageError(f"--chat-template {chat_template}: line {exc.lineno}: {exc.message}") from None
    options = ServerOptions(
        model=model, device=device, dtype=dtype, quantize=quantize, host=host, port=port, api_key=api_key,
        max_queue=max_queue, batch_size=_batch_size(batch_size), metrics=metrics, chat_template=template,
    )
    code = run_server(options, lambda line: messages.info(line))
    if code:
        raise typer.Exit(code)


@app.command(
    epilog="Examples:\n\n"
    "  aigc finetune poems.txt -o ./my-poet --model gpt2 --epochs 3 --block-size 256\n\n"
    "  aigc finetune lines.txt -o ./taglines --line-by-line --steps 500 --sample-every 100 --sample-prompt \"Our coffee\"\n\n"
    "  aigc finetune poems.txt -o ./my-poet --model gpt2 --epochs 3 --block-size 256 --resume     (after an interruption)\n\n"
    "  aigc generate \"The moon\" --model ./my-poet\n\n"
    f"{EXIT_CODES_HELP}"
)
@_boundary
def finetune(
    data: Annotated[list[str], typer.Argument(help="Text files, JSONL files with a \"text\" field, or '-' for stdin.", show_default=False, metavar="DATA...")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the fine-tuned model (and its checkpoint and training log).", metavar="DIR")],
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training data, when --steps is not given.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, linear decay after the warm-up).")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    block_size: Annotated[Optional[int], typer.Option(help="Tokens per training block (default: the model's context, at most 1024).")] = None,
    line_by_line: Annotated[bool, typer.Option(help="Each non-empty line is one example (instead of packed blocks).")] = False,
    val_split: Annotated[Optional[float], typer.Option(help="Fraction of the examples held out for validation perplexity (default 0.05).")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation data file (instead of --val-split).", metavar="FILE")] = None,
    eval_every: Annotated[int, typer.Option(help="Validation perplexity every N steps (0: before and after only).")] = 0,
    sample_every: Annotated[int, typer.Option(help="Print a sample every N steps (0: never).")] = 0,
    sample_prompt: Annotated[str, typer.Option(help="Prompt of the samples (default: the start of the data).", metavar="TEXT")] = "",
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only on Ctrl-C).")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in -o DIR (same data and settings).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in -o DIR.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initial state, data order, split and dropout.")] = 0,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 1.0,
    model: ModelOpt = "gpt2",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Fine-tune the model on your text; the result is a model directory for --model DIR."""
    from aigc_cli.apps.finetune import Schedule, Trainer, TrainSettings, prepare_output, read_documents

    _check_device(device, dtype)
    if dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype: training runs in float32, with bfloat16 autocast on a GPU (got {dtype})")
    for flag, value in (("--eval-every", eval_every), ("--sample-every", sample_every), ("--save-every", save_every)):
        if value < 0:
            raise UsageError(f"{flag}: must be 0 or more (got {value})")
    if val is not None and val_split is not None:
        raise UsageError("--val and --val-split: give one")
    settings = TrainSettings(
        model=model, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, block_size=block_size,
        line_by_line=line_by_line, val_split=0.0 if val is not None else (0.05 if val_split is None else val_split), val_file=val, seed=seed,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )
    settings.check()
    messages = Messages(Streams())
    docs, data_hash = read_documents(data)
    val_docs = read_documents([val])[0] if val is not None else None
    out = Path(output)
    prepare_output(out, resume, overwrite)
    with messages.status(f"Loading {model}..."):
        trainer = Trainer(settings, Schedule(eval_every, sample_every, sample_prompt, save_every), out, docs, data_hash, val_docs, device, dtype, messages.info)
    if resume:
        trainer.load_checkpoint()
    messages.info(
        f"training on {len(trainer.train)} examples of up to {trainer.block} tokens ({len(trainer.val)} held out), "
        f"{trainer.total} steps from step {trainer.state.step}"
    )
    try:
        with _terminate_as_interrupt(), messages.training(trainer.total, trainer.state.step) as update:
            result = trainer.run(update)
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        messages.error(f"interrupted at step {trainer.state.step}; checkpoint saved: rerun the same command with --resume to continue")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    messages.info(f"saved the model to {out} after {result['steps']} steps (training log: {out / 'training_log.jsonl'})")


@app.command(epilog="Example:\n\n  aigc info --model ./my-finetuned-gpt2")
@_boundary
def info(
    model: ModelOpt = "gpt2",
    debug: DebugOpt = False,
) -> None:
    """Show versions, available devices and where --model resolves, without loading it."""
    import platform

    import torch
    import transformers

    from aigc_cli.models.loading import resolve

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    lines = [
        f"aigc {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"devices: {', '.join(devices)}",
    ]
    for line in lines:
        typer.echo(line)
    res = resolve(model)
    where = {
        "builtin": "built-in tiny random GPT-2 (no download)",
        "local": f"local directory {res.path}",
        "hub-cache": f"Hugging Face cache {res.path}",
        "hub": "Hugging Face Hub (will be downloaded and cached on first use)",
    }[res.kind]
    typer.echo(f"model {model}: {where}")


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
