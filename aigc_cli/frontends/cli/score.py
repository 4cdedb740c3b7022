"""`aigc score`: perplexity of a text (or of each line) under the model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from aigc_cli.core.errors import UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.core.settings import MAX_BATCH
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, Streams, render_rows

EPILOG = (
    "Examples:\n\n"
    "  aigc score essay.txt\n\n"
    "  cat sentences.txt | aigc score - --per-line --format jsonl\n\n"
    f"{o.EXIT_CODES_HELP}"
)


@o.with_model()
def command(
    spec: ModelSpec,
    path: Annotated[str, typer.Argument(help="Text file to score, or '-' for stdin.", show_default=False, metavar="FILE")],
    per_line: Annotated[bool, typer.Option(help="Score each non-empty line on its own.")] = False,
    stride: Annotated[Optional[int], typer.Option(help="Sliding-window stride for texts longer than the context (default: half of it).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Perplexity, mean negative log-likelihood and token count of a text under the model.

    Every token is scored, the first one conditioned on the model's BOS token (<|endoftext|> for
    GPT-2); texts longer than the context use a sliding window.
    """
    if stride is not None and stride < 1:
        raise UsageError(f"--stride: must be at least 1 (got {stride})")
    o.check_range("--batch-size", batch_size, 1, MAX_BATCH)
    text = o.read_text(path)
    streams = Streams()
    from aigc_cli.engine.scoring import score_text

    engine = o.load_engine(spec, Messages(streams))
    if stride is not None and stride > engine.context_length:
        raise UsageError(f"--stride: must not exceed the model's context of {engine.context_length} (got {stride})")
    with Messages(streams).progress(None, unit="windows") as update:
        rows = score_text(engine, text, path, per_line, stride, batch_size, on_progress=update)
    columns = (["line"] if per_line else []) + ["perplexity", "nll", "tokens"]
    render_rows(streams, output_format, columns, rows, title=None)
