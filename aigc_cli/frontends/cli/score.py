"""`aigc score`: perplexity of a text (or of each line) under the model, or with `--tokens` what the
model sees at each token (GLTR colours on a terminal, records in pipes, an HTML page with `--html`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from aigc_cli.core.errors import ExitCode, UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.core.settings import MAX_BATCH
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, Streams, render_rows, render_token_views
from aigc_cli.jobs.textfiles import Problems, read_lines, read_text

MAX_TOP = 100  # alternatives per token: enough to read, and bounded so that records stay small

EPILOG = (
    "Examples:\n\n"
    "  aigc score essay.txt\n\n"
    "  cat sentences.txt | aigc score - --per-line --format jsonl\n\n"
    "  aigc score essay.txt --tokens --top 5 --html essay.html\n\n"
    f"{o.EXIT_CODES_HELP}"
)


@o.with_model()
def command(  # about 60 lines of flag checks, reading, and the ways out (table, token views, HTML, JSONL); the work is in apps/ and engine/
    spec: ModelSpec,
    path: Annotated[str, typer.Argument(help="Text file to score, or '-' for stdin.", show_default=False, metavar="FILE")],
    per_line: Annotated[bool, typer.Option(help="Score each non-empty line on its own (a line that cannot be scored is reported and skipped).")] = False,
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window stride for texts longer than the context (default: half of it).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    tokens: Annotated[bool, typer.Option("--tokens", help="Show every token: its log-probability, rank (1 = the model's first choice), entropy and the --top alternatives, coloured by GLTR bucket on a terminal.")] = False,
    top: Annotated[int, typer.Option(help="With --tokens: how many of the model's most likely tokens to list at each position.")] = 5,
    html: Annotated[Optional[Path], typer.Option("--html", help="With --tokens: also write a self-contained HTML page of the token view to FILE.", metavar="FILE", show_default=False)] = None,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Perplexity, mean negative log-likelihood and token count of a text under the model.

    Every token is scored, the first one conditioned on the model's start token (<|endoftext|>
    for GPT-2, [CLS] for a Chinese model with a BERT vocabulary); texts longer than the context
    use a sliding window.
    """
    if stride is not None and stride < 1:
        raise UsageError(f"--stride: must be at least 1 (got {stride})")
    o.check_range("--batch-size", batch_size, 1, MAX_BATCH)
    o.check_range("--top", top, 0, MAX_TOP)
    if html is not None and not tokens:
        raise UsageError("--html: needs --tokens (the page shows the token view)")
    if html is not None:
        from aigc_cli.frontends.cli.html import check_writable

        check_writable(html, "--html")
    streams = Streams()
    messages = Messages(streams)
    name = "stdin" if path == "-" else path
    problems = Problems(name, messages.warn)
    errors: list[dict[str, Any]] = []
    if per_line:
        pieces = []
        for line in read_lines(path):
            if line.text is None:
                errors.append({"line": line.number, "error": {"code": "invalid_utf8", "message": line.problem}})
            elif line.text.strip():
                pieces.append((line.number, line.text))
    else:
        pieces = [(0, read_text(path))]
    engine = o.load_engine(spec, messages)
    if stride is not None and stride > engine.context_length:
        raise UsageError(f"--stride: must not exceed the model's context of {engine.context_length} (got {stride})")
    with messages.progress(None, unit="windows") as update:
        if tokens:
            from aigc_cli.apps.tokenview import token_records

            rows = token_records(engine, pieces, top, stride, batch_size, on_progress=update)
        else:
            from aigc_cli.engine.scoring import score_texts

            rows = score_texts(engine, pieces, stride, batch_size, on_progress=update)
    if not per_line:
        if "error" in rows[0]:
            raise UsageError(f"{name}: {rows[0]['error']['message']}")
        rows = [{k: v for k, v in rows[0].items() if k != "line"}]
    rows = sorted(errors + rows, key=lambda r: r.get("line", 0))
    for row in rows:
        if "error" in row:
            problems.add(row["line"], row["error"]["message"])
    jsonl = streams.resolve(output_format) is OutputFormat.jsonl
    shown = rows if jsonl else [r for r in rows if "error" not in r]  # a table has no room for errors: they went to stderr
    if tokens:
        names = [f"{name} line {r['line']}" if per_line else name for r in shown if "error" not in r]
        good = [r for r in rows if "error" not in r]
        if html is not None:
            from aigc_cli.frontends.cli.html import write_page

            write_page(html, good, names, title=f"aigc score --tokens: {name}", model=spec.name)
            messages.info(f"wrote {html}")
        render_token_views(streams, output_format, shown, names)
    else:
        render_rows(streams, output_format, (["line"] if per_line else []) + ["perplexity", "nll", "tokens"], shown, title=None)
    if problems:
        messages.warn(f"{len(problems)} line{'s' if len(problems) != 1 else ''} of {name} could not be scored")
        raise typer.Exit(int(ExitCode.PARTIAL))
