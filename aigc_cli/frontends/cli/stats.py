"""`aigc stats`: measures of generated text (distinct-n, self-BLEU, repetition, lengths, and with
--model perplexity), overall and per prompt."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from aigc_cli.core.errors import ExitCode, UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, Streams, json_line, render_rows
from aigc_cli.jobs.textfiles import Problems, read_lines

EPILOG = (
    "Examples:\n\n"
    "  aigc generate 'Once upon a time' -n 20 --format jsonl > out.jsonl && aigc stats out.jsonl\n\n"
    "  aigc stats stories.txt --unit word --format jsonl\n\n"
    "  aigc stats out.jsonl --model gpt2\n\n"
    f"{o.EXIT_CODES_HELP}"
)


class Unit(str, Enum):
    auto = "auto"
    word = "word"
    char = "char"
    token = "token"


class InputFormat(str, Enum):
    auto = "auto"
    jsonl = "jsonl"
    lines = "lines"


_BATCH = 16  # texts scored together with --model
MAX_BLEU_SAMPLE = 100_000


@o.with_model(named=True, model_help="Given, the texts are also scored under it (mean log-probability, perplexity); --unit token uses its tokenizer.")
def command(  # about 60 lines of flag checks, the streamed reading with its progress, and the table or JSONL out; the measures are in apps/textstats.py
    spec: ModelSpec,
    named_model: str | None,
    path: Annotated[str, typer.Argument(help="Generated text: aigc generate's JSONL, or plain text with one item per line; '-' for stdin.", show_default=False, metavar="FILE")],
    unit: Annotated[Unit, typer.Option(help="What n-grams and lengths count: auto (characters for Chinese and Japanese text, else whitespace words), word, char, or token (the --model's tokenizer).")] = Unit.auto,
    input_format: Annotated[InputFormat, typer.Option("--input-format", help="auto (JSONL when the first line is a JSON object), jsonl or lines.")] = InputFormat.auto,
    bleu_sample: Annotated[int, typer.Option(help="Self-BLEU over a seeded sample of at most this many texts per group.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the self-BLEU sample.")] = 0,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Distinct-1/2/3, self-BLEU, repeated n-grams, lengths (and with --model mean log-probability
    and perplexity) of generated texts, overall and per prompt.

    Distinct-n is the number of distinct n-grams over the number of n-grams of all texts of a group;
    self-BLEU is Texygen's (each text against all the others; BLEU as nltk's sentence_bleu
    computes it with smoothing method1).
    """
    o.check_range("--bleu-sample", bleu_sample, 2, MAX_BLEU_SAMPLE)
    if unit is Unit.token and named_model is None:
        raise UsageError("--unit token: needs --model (its tokenizer makes the tokens)")
    from aigc_cli.apps.textstats import Item, Stats, parse_items, text_logprobs

    streams = Streams()
    messages = Messages(streams)
    name = "stdin" if path == "-" else path
    problems = Problems(name, messages.warn)
    engine = o.load_engine(spec, messages) if named_model is not None else None
    tokenize = None
    if engine is not None:
        tok = engine.tokenizer
        tokenize = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    stats = Stats(unit.value, bleu_sample, seed, tokenize)
    jsonl = streams.resolve(output_format) is OutputFormat.jsonl
    pending: list[tuple[Item, list[Any]]] = []

    def score_pending() -> None:
        if engine is None or not pending:
            return
        for (item, groups), (total, count) in zip(pending, text_logprobs(engine, [i for i, _ in pending], _BATCH)):
            for g in groups:
                g.add_logprob(total, count)
        pending.clear()

    with messages.progress(None, unit="bytes") as update:
        lines = ((line.number, line.text, line.problem) for line in read_lines(path, on_bytes=lambda done, size: update(done, size or done)))
        for entry in parse_items(lines, input_format.value):
            if isinstance(entry, dict):
                problems.add(entry["line"], entry["error"]["message"])
                if jsonl:
                    streams.stdout.write(json_line(entry) + "\n")
                continue
            try:
                groups = stats.add(entry)
            except Exception as exc:  # noqa: BLE001 - a tokenizer's refusal, this text alone
                problems.add(entry.line, f"the tokenizer refused the text ({type(exc).__name__})")
                if jsonl:
                    streams.stdout.write(json_line({"line": entry.line, "error": {"code": "tokenizer_error", "message": str(exc)}}) + "\n")
                continue
            pending.append((entry, groups))
            if len(pending) >= _BATCH:
                score_pending()
        score_pending()
    if stats.overall.texts == 0:
        raise UsageError(f"{name}: no text to measure" + (f" ({len(problems)} bad lines)" if problems else ""))
    rows = stats.results(with_model=engine is not None)
    rich = streams.resolve(output_format) is OutputFormat.rich
    if rich:  # a table for people: the prompt in its group's cell, cut short (plain and JSONL keep it whole)
        rows = [{**r, "group": r["group"] + (f": {_short(r['prompt'])}" if r["prompt"] is not None else "")} for r in rows]
    columns = ["group", *([] if rich else ["prompt"]), "texts", "unit", "distinct_1", "distinct_2", "distinct_3", "self_bleu", "rep_4", "length_mean"]
    if engine is not None:
        columns += ["mean_logprob", "perplexity"]
    sampled = any(r["bleu_sampled"] for r in rows)
    title = f"self-BLEU over a seeded sample of {bleu_sample} texts where a group has more (--seed {seed})" if sampled else None
    render_rows(streams, output_format, columns, rows, title=title)
    if problems:
        messages.warn(f"{len(problems)} line{'s' if len(problems) != 1 else ''} of {name} could not be measured")
        raise typer.Exit(int(ExitCode.PARTIAL))


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
