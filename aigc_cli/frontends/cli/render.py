"""Rendering for people and for pipes: Rich, plain text, JSONL; the only module that imports rich."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any, Callable, Iterable, Iterator

from rich.console import Console
from rich.text import Text

from aigc_cli.core.textrules import stream_safe_length


class OutputFormat(str, Enum):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    jsonl = "jsonl"


@dataclass
class Streams:
    """The process's streams, injectable so tests can simulate a terminal or a pipe."""

    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)

    @staticmethod
    def _tty(stream: IO[str]) -> bool:
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    @property
    def stdout_tty(self) -> bool:
        return self._tty(self.stdout)

    @property
    def stderr_tty(self) -> bool:
        return self._tty(self.stderr)

    @property
    def no_color(self) -> bool:
        return os.environ.get("NO_COLOR", "") != ""

    def resolve(self, fmt: OutputFormat) -> OutputFormat:
        if fmt is OutputFormat.auto:
            return OutputFormat.rich if self.stdout_tty else OutputFormat.plain
        return fmt

    def err_console(self) -> Console:
        return Console(
            file=self.stderr,
            highlight=False,
            markup=False,
            no_color=self.no_color,
            force_terminal=self.stderr_tty or None,
        )

    def out_console(self) -> Console:
        return Console(file=self.stdout, highlight=False, markup=False, no_color=self.no_color, force_terminal=True)


_CONTROLS = {c: (f"^{chr(c + 64)}" if c < 32 else "^?") for c in [*range(32), 127] if chr(c) not in "\n\t"}
_CONTROLS.update({c: f"M-^{chr(c - 128 + 64)}" for c in range(128, 160)})  # C1 controls, as cat -v shows them


def visible(text: str) -> str:
    """Control characters shown as `cat -v` shows them (ESC as ^[, CR as ^M), newline and tab
    kept: text from a prompt or a model can never clear a screen or retitle a terminal."""
    return text.translate(_CONTROLS)


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


class Messages:
    """Progress, warnings and errors: always stderr, never stdout."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.console = streams.err_console()

    def _print(self, line: str, style: str = "") -> None:
        shown = visible(line) if self.streams.stderr_tty else line  # messages quote prompts and file names
        self.console.print(Text(shown, style=style), soft_wrap=True)

    def error(self, message: str, hint: str | None = None) -> None:
        self._print(f"aigc: error: {message}" + (f" (hint: {hint})" if hint else ""), "bold red")

    def warn(self, message: str) -> None:
        self._print(f"aigc: warning: {message}", "yellow")

    def info(self, message: str) -> None:
        self._print(message)

    @contextmanager
    def progress(self, total: int | None, unit: str = "prompts") -> Iterator[Callable[[int, int], None]]:
        """A progress bar on a terminal; yields update(done, n): with unit "prompts", n is the
        tokens generated so far (shown as tokens/s); otherwise n is the total of `unit` to do."""
        if not self.streams.stderr_tty:
            yield lambda done, tokens: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        started = time.perf_counter()
        # redirect_stdout=False: stdout carries records only, never the bar's re-rendered output.
        bar = Progress(
            TextColumn(unit),
            BarColumn(),
            MofNCompleteColumn(),
            *([TextColumn("{task.fields[rate]} tok/s")] if unit == "prompts" else []),
            TimeRemainingColumn(),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
        )
        task = bar.add_task(unit, total=total, rate="-")

        def update(done: int, n: int) -> None:
            if unit != "prompts":
                bar.update(task, completed=done, total=n)
                return
            rate = n / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:,.0f}")

        with bar:
            yield update

    @contextmanager
    def training(self, total: int, done: int = 0) -> Iterator[Callable[[int, float, float], None]]:
        """A training bar on a terminal (steps, loss, tokens/s, ETA); yields update(step, loss, tok/s)."""
        if not self.streams.stderr_tty:
            yield lambda step, loss, rate: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        task = bar.add_task("steps", total=total, completed=done, loss="-", rate="-")
        with bar:
            yield lambda step, loss, rate: bar.update(task, completed=step, loss=f"{loss:.3f}", rate=f"{rate:,.0f}")

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner on a terminal; silence in a pipe."""
        if self.streams.stderr_tty:
            with self.console.status(message):
                yield
        else:
            yield


class SequenceRenderer:
    """Writes completions to stdout in the chosen format, streaming a lone sequence when asked."""

    def __init__(
        self, streams: Streams, fmt: OutputFormat, multi_prompt: bool
    ) -> None:
        self.streams = streams
        self.fmt = streams.resolve(fmt)
        self.multi_prompt = multi_prompt
        self.console = streams.out_console() if self.fmt is OutputFormat.rich else None
        # Text meant for a screen shows control characters escaped; plain text to a pipe is the data.
        self.escape = self.fmt is OutputFormat.rich or streams.stdout_tty
        self._shown = 0
        self._streaming: Any = None

    @property
    def can_stream(self) -> bool:
        return self.fmt in (OutputFormat.rich, OutputFormat.plain) and self.streams.stdout_tty

    def _title(self, c: Any) -> str:
        prefix = f"Prompt {c.id + 1}, " if self.multi_prompt and isinstance(c.id, int) else ""
        return f"{prefix}Sequence {c.index + 1}" if prefix else f"Sequence {c.index + 1}"

    def _write(self, text: str, style: str = "") -> None:
        if self.escape:
            text = visible(text)
        if self.console is not None:
            self.console.print(Text(text, style=style), end="", soft_wrap=True)
            self.console.file.flush()
        else:
            self.streams.stdout.write(text)
            self.streams.stdout.flush()

    def _header(self, c: Any) -> None:
        if self.console is not None:
            self.console.rule(Text(self._title(c), style="bold"), align="left")
        else:
            self.streams.stdout.write(f"--- {self._title(c)} ---\n")
        self._write(c.prompt, "dim")

    def stream(self, c: Any, text: str, stops: tuple[str, ...]) -> None:
        """Show the part of `text` that is final (no half stop string, no half character)."""
        if self._streaming is None:
            self._streaming = c
            self._shown = 0
            self._header(c)
        safe = stream_safe_length(text, stops)
        if safe > self._shown:
            self._write(text[self._shown : safe], "bold cyan")
            self._shown = safe

    def error_record(self, record: dict[str, Any], messages: Messages) -> None:
        """A record that could not be processed: a JSONL record, or a warning for people."""
        if self.fmt is OutputFormat.jsonl:
            self.streams.stdout.write(json_line(record) + "\n")
            self.streams.stdout.flush()
        else:
            messages.warn(record["error"]["message"])

    def completion(self, c: Any) -> None:
        if self.fmt is OutputFormat.jsonl:
            if c.record is None:
                raise ValueError("JSONL output needs each completion's record (batch.generated_record)")
            self.streams.stdout.write(json_line(c.record) + "\n")
            self.streams.stdout.flush()
            return
        if self._streaming is not None:
            self._write(c.text[self._shown :], "bold cyan")
            self._streaming = None
        else:
            self._header(c)
            self._write(c.text, "bold cyan")
        self._write("\n\n")


def render_rows(
    streams: Streams, fmt: OutputFormat, columns: list[str], rows: list[dict[str, Any]], title: str | None = None
) -> None:
    """Tabular results: a Rich table, tab-separated plain text with a header, or one JSON object per row.

    Rows are dicts; `columns` picks what the table shows, JSONL carries every key.
    """
    fmt = streams.resolve(fmt)
    if fmt is OutputFormat.jsonl:
        _jsonl(streams, rows)
        return
    escape = fmt is OutputFormat.rich or streams.stdout_tty
    title = visible(title) if escape and title else title
    cells = [[visible(_cell(row.get(c))) if escape else _cell(row.get(c)) for c in columns] for row in rows]
    if fmt is OutputFormat.plain:
        if title:
            streams.stdout.write(f"# {title}\n")
        streams.stdout.write("\t".join(columns) + "\n")
        for line in cells:
            streams.stdout.write("\t".join(v.replace("\t", " ").replace("\n", " ") for v in line) + "\n")
        streams.stdout.flush()
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for line in cells:
        table.add_row(*(Text(v) for v in line))
    streams.out_console().print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def render_poems(
    streams: Streams, fmt: OutputFormat, poems: list[Any], title: str, annotate: bool, provenance: dict[str, Any]
) -> None:
    """One Rich panel per poem (lines annotated on request), plain text, or one JSON object per poem."""
    fmt = streams.resolve(fmt)
    if fmt is OutputFormat.jsonl:
        for p in poems:
            record = {
                "index": p.index,
                "text": p.text,
                "lines": p.lines,
                "counts": p.counts,
                "rhymes": p.rhymes,
                "marks": p.marks,
                **({"pattern": p.pattern} if p.pattern else {}),
                "score": p.score,
                "seed": p.seed,
                **provenance,
            }
            streams.stdout.write(json_line(record) + "\n")
        streams.stdout.flush()
        return

    escape = fmt is OutputFormat.rich or streams.stdout_tty
    title = visible(title) if escape else title

    def lines_of(p: Any) -> list[str]:
        if escape:
            p = dataclasses.replace(p, lines=[visible(line) for line in p.lines])
        if not annotate:
            return list(p.lines)
        width = max(len(line) for line in p.lines)
        marks = p.marks or [""] * len(p.lines)
        return [
            f"{line.ljust(width)}  [{count}{' | ' + rhyme if rhyme else ''}{' | ' + mark if mark else ''}]"
            for line, count, rhyme, mark in zip(p.lines, p.counts, p.rhymes, marks)
        ] + ([f"({p.pattern})"] if p.pattern else [])

    if fmt is OutputFormat.plain:
        for p in poems:
            streams.stdout.write(f"--- Poem {p.index + 1} ({title}, score {p.score:.3f}) ---\n")
            streams.stdout.write("\n".join(lines_of(p)) + "\n\n")
        streams.stdout.flush()
        return
    from rich.panel import Panel

    console = streams.out_console()
    for p in poems:
        console.print(
            Panel(Text("\n".join(lines_of(p))), title=Text(f"Poem {p.index + 1}: {title}"), subtitle=Text(f"score {p.score:.3f}"), expand=False)
        )


# GLTR's colours for the rank buckets (apps.tokenview.BUCKETS), as backgrounds behind black text:
# green, yellow, red, purple, picked from xterm's 256 colours so that every terminal shows them
GLTR_COLOURS = {"top10": "#5fd75f", "top100": "#ffd75f", "top1000": "#ff8787", "beyond": "#d787ff"}
_NO_COLOUR_STYLES = {"top10": "none", "top100": "underline", "top1000": "bold underline", "beyond": "reverse"}
_TOKEN_COLUMNS = ["line", "index", "token", "id", "logprob", "rank", "entropy", "bucket"]


def render_token_views(streams: Streams, fmt: OutputFormat, records: list[dict[str, Any]], names: list[str]) -> None:
    """`aigc score --tokens`: each text's tokens coloured by GLTR bucket with a legend and a summary
    (Rich); one row per token, tab-separated (plain); or one JSON object per text (JSONL).
    `names` titles each record (a file name, or "line N")."""
    from aigc_cli.apps.tokenview import BUCKET_LABELS, fractions

    fmt = streams.resolve(fmt)
    if fmt is OutputFormat.jsonl:
        _jsonl(streams, records)
        return
    if fmt is OutputFormat.plain:
        escape = streams.stdout_tty
        streams.stdout.write("\t".join(_TOKEN_COLUMNS) + "\n")
        for record in records:
            for i, t in enumerate(record["tokens"]):
                # the piece as a TSV cell: backslash, tab and newline escaped, so one token is one row
                piece = t["token"].replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
                row = [record.get("line", ""), i, visible(piece) if escape else piece, t["id"], t["logprob"], t["rank"], t["entropy"], t["bucket"]]
                streams.stdout.write("\t".join(_cell(v) for v in row) + "\n")
        streams.stdout.flush()
        return
    console = streams.out_console()
    # under NO_COLOR the buckets are told apart by text attributes instead of colours
    styles = _NO_COLOUR_STYLES if streams.no_color else {b: f"black on {c}" for b, c in GLTR_COLOURS.items()}
    legend = Text("GLTR rank: ")
    for name, label in BUCKET_LABELS.items():
        legend.append(f" {label} ", style=styles[name])
        legend.append(" ")
    legend.append(" not scored ", style="dim")
    console.print(legend)
    for record, name in zip(records, names):
        console.rule(Text(visible(name), style="bold"), align="left")
        text = Text()
        for t in record["tokens"]:
            text.append(visible(t["token"]), style=styles[t["bucket"]] if t["bucket"] else "dim")
        console.print(text, soft_wrap=True)
        shares = fractions(record)
        summary = Text("  ".join(f"{BUCKET_LABELS[b]} {shares[b]:.0%}" for b in shares), style="bold")
        summary.append(f"   perplexity {record['perplexity']:.2f} over {record['token_count']} tokens")
        console.print(summary)


def _jsonl(streams: Streams, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line on stdout."""
    for row in rows:
        streams.stdout.write(json_line(row) + "\n")
    streams.stdout.flush()
