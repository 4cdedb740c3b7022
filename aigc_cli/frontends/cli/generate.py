"""`aigc generate`: parse the flags into a job, pick where it runs (here, a server, Ray), run the
pipeline, render the records."""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer

from aigc_cli.core.errors import ExitCode, UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.core.settings import GenerationSettings
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, SequenceRenderer, Streams
from aigc_cli.jobs.pipeline import GenerateJob, GeneratePipeline
from aigc_cli.jobs.records import InputFormat, load_template, parse_shard
from aigc_cli.jobs.sources import PromptSource, prompt_source

EPILOG = (
    "Examples:\n\n"
    "  aigc generate \"Hello, how are you?\" -n 5\n\n"
    "  aigc generate \"Once upon a time\" --decoding beam --num-beams 5 -n 2\n\n"
    "  aigc generate \"The news today:\" --stop \"\\n\" --ban weather --format jsonl\n\n"
    "  aigc generate -f prompts.txt -o out.jsonl --seed 1     (then add --resume after an interruption)\n\n"
    "  cat prompts.jsonl | aigc generate - --shard 0/4 > part0.jsonl\n\n"
    f"{o.EXIT_CODES_HELP}"
)
SETTINGS = (
    "num_sequences", "max_new_tokens", "min_new_tokens", "decoding", "temperature", "top_k", "top_p", "typical_p", "min_p",
    "num_beams", "length_penalty", "early_stopping", "penalty_alpha", "repetition_penalty", "no_repeat_ngram_size", "stop", "ban",
    "seed", "stop_token_ids",
)


class Backend(str, Enum):
    local = "local"
    ray = "ray"


@o.with_model(named=True)
@o.with_settings(*SETTINGS)
def command(
    spec: ModelSpec,
    named_model: Optional[str],
    settings: GenerationSettings,
    prompts: Annotated[
        Optional[list[str]], typer.Argument(help="One or more prompts; '-' reads prompts from stdin.", show_default=False, metavar="PROMPT...")
    ] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read prompts from this file ('-' for stdin).", metavar="FILE")] = None,
    input_format: Annotated[InputFormat, typer.Option(help="auto (JSONL if the first line is a JSON object), lines or jsonl.")] = InputFormat.auto,
    template: Annotated[Optional[str], typer.Option(help="Render each input record into this $field template.", metavar="FILE")] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Write JSONL records to this file (never one of the inputs; one run at a time).", metavar="FILE")
    ] = None,
    resume: Annotated[bool, typer.Option(help="With -o: skip records the file already holds, append the rest.")] = False,
    retry_errors: Annotated[
        bool, typer.Option(help="With --resume: run again the records the file holds error records for; their new records take those lines' places.")
    ] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad input record instead of writing an error record.")] = False,
    batch_size: Annotated[
        str, typer.Option(help="Rows decoded together, or auto: up to 64, on CPU fewer when their KV cache would pass 1 GiB.", metavar="N|auto")
    ] = "auto",
    shard: Annotated[Optional[str], typer.Option(help="i/N: process only records i, i+N, i+2N, ... (0-based).", metavar="i/N")] = None,
    deterministic: Annotated[bool, typer.Option(help="Generate each sequence alone: sampled output then never depends on batch mates.")] = False,
    server: Annotated[
        Optional[str],
        typer.Option(envvar="AIGC_SERVER", help="Generate on a running 'aigc serve' at this URL instead of loading the model here.", metavar="URL"),
    ] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="AIGC_API_KEY", help="The server's API key (with --server).", metavar="KEY")] = None,
    connect_timeout: Annotated[Optional[float], typer.Option(help="With --server: seconds to wait for a connection [default: 10].", metavar="SECONDS")] = None,
    read_timeout: Annotated[Optional[float], typer.Option(help="With --server: seconds the server may stay silent [default: 300].", metavar="SECONDS")] = None,
    backend: Annotated[Backend, typer.Option(help="local (this process) or ray (actors on a Ray cluster; pip install \"aigc[ray]\").")] = Backend.local,
    ray_address: Annotated[
        Optional[str], typer.Option(help="With --backend ray: the cluster to join (default: RAY_ADDRESS, else a local instance).", metavar="ADDRESS")
    ] = None,
    workers: Annotated[int, typer.Option(help="With --backend ray: actors, each loading the model once.")] = 2,
    worker_cpus: Annotated[float, typer.Option(help="With --backend ray: CPUs per actor.")] = 1.0,
    worker_gpus: Annotated[float, typer.Option(help="With --backend ray: GPUs per actor.")] = 0.0,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Generate N numbered continuations of each prompt (arguments, a file, or stdin)."""
    settings = settings.resolved()
    remote = _remote(server, api_key, connect_timeout, read_timeout)  # a bad URL or timeout before anything is opened
    source = prompt_source(prompts, file)
    if template is not None and source.kind == "args":
        raise UsageError("--template: renders records of -f FILE or stdin, not prompt arguments")
    if resume and output is None:
        raise UsageError("--resume: needs -o/--output FILE (the file to continue)")
    if retry_errors and not resume:
        raise UsageError("--retry-errors: only with --resume (it retries the error records of the -o file)")
    ray = (ray_address, workers, worker_cpus, worker_gpus)
    load = _loader(spec, named_model, remote, backend, ray, Messages(Streams()))
    tmpl = load_template(template) if template is not None else None
    fmt = OutputFormat.jsonl if output is not None or (source.kind != "args" and output_format is OutputFormat.auto) else output_format
    job = GenerateJob(
        records=lambda: source.records(tmpl, input_format),
        settings=settings,
        output=output,
        inputs=[*source.inputs, *([template] if template else [])],
        resume=resume,
        shard=parse_shard(shard) if shard is not None else None,
        batch_size=1 if deterministic else o.batch_size(batch_size),
        strict=strict or source.kind == "args",
        provenance=fmt is OutputFormat.jsonl,
        retry_errors=retry_errors,
    )
    _run(GeneratePipeline(job), load, source, fmt, output)


def _remote(server: str | None, api_key: str | None, connect_timeout: float | None, read_timeout: float | None) -> Any:
    """With --server: what `RemoteEngine.connect` needs, its URL and timeouts checked (usage errors)."""
    if server is None:
        if connect_timeout is not None or read_timeout is not None:
            raise UsageError("--connect-timeout and --read-timeout: only with --server (or AIGC_SERVER)")
        return None
    from aigc_cli.frontends.client import Timeouts, server_address

    server_address(server)
    return server, api_key, Timeouts.checked(connect_timeout, read_timeout)


def _loader(
    spec: ModelSpec, named: str | None, remote: tuple[str, str | None, Any] | None, backend: Backend, ray: tuple[Any, ...], messages: Messages
) -> Callable[[], Any]:
    """Where the job runs, checked now (usage errors before anything is opened), loaded later."""
    address, workers, cpus, gpus = ray
    server = remote[0] if remote is not None else None
    if server is not None and not spec.defaults:
        raise UsageError("--device, --dtype and --quantize: set them where the server runs (aigc serve), not with --server")
    if backend is Backend.ray:
        if server is not None:
            raise UsageError("--backend ray: generates on a Ray cluster; --server on a running aigc serve: choose one")
        if workers < 1 or cpus <= 0 or gpus < 0:
            raise UsageError(f"--workers must be at least 1, --worker-cpus above 0 and --worker-gpus not negative (got {workers}, {cpus:g}, {gpus:g})")
        from aigc_cli.frontends.ray_backend import RayEngine, import_ray

        import_ray()  # the missing extra is a usage error before anything is opened

        def on_ray() -> Any:
            with messages.status(f"Starting {workers} Ray workers with {spec.name}..."):
                return RayEngine(spec, address, workers, cpus, gpus)

        return on_ray
    if ray != (None, 2, 1.0, 0.0):
        raise UsageError("--ray-address, --workers, --worker-cpus and --worker-gpus: only with --backend ray")
    if remote is not None:
        from aigc_cli.frontends.client import RemoteEngine

        url, api_key, timeouts = remote
        return lambda: RemoteEngine.connect(url, api_key, named, timeouts)
    return lambda: o.load_engine(spec, messages)


def _run(pipeline: GeneratePipeline, load: Callable[[], Any], source: PromptSource, fmt: OutputFormat, output: str | None) -> None:
    """Run the job with a progress bar (files and stdin); Ctrl-C and SIGTERM exit 130 with a resume hint."""
    streams = Streams()
    messages = Messages(streams)

    def make_emit(out: Any, final: GenerationSettings) -> tuple[Any, Any]:
        renderer = SequenceRenderer(Streams(stdout=out if out is not None else streams.stdout, stderr=streams.stderr), fmt, source.many)
        lone = source.kind == "args" and len(source.prompts) * final.num_sequences == 1
        on_text = (lambda c, text: renderer.stream(c, text, final.stop)) if lone and renderer.can_stream else None
        return (lambda item: renderer.error_record(item, messages) if isinstance(item, dict) else renderer.completion(item)), on_text

    try:
        # The bar is for file and stdin jobs; prompts given as arguments are shown (or streamed) directly.
        bar = messages.progress(source.total) if source.kind != "args" else nullcontext(lambda done, tokens: None)
        with o.terminate_as_interrupt(), bar as update:
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
        messages.warn(f"{summary.errors} of {summary.records} records could not be processed: {summary.error_counts()} (see their error records)")
        raise typer.Exit(int(ExitCode.PARTIAL))
