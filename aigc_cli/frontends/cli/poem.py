"""`aigc poem`: write poems whose form is guaranteed (apps.poem), or check an existing one
(apps.poetics), and render them."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from aigc_cli.core.errors import UsageError
from aigc_cli.core.settings import GenerationSettings
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages, OutputFormat, Streams, render_poems, render_rows
from aigc_cli.jobs.textfiles import read_text

if TYPE_CHECKING:
    from aigc_cli.apps.poetics import Form

EPILOG = (
    "Examples:\n\n"
    "  aigc poem \"the sea at night\" --form haiku -n 2 --annotate\n\n"
    "  aigc poem autumn --form sonnet --candidates 4\n\n"
    "  aigc poem 春天 --form qijue --acrostic 春夏秋冬 --model uer/gpt2-chinese-poem\n\n"
    "  aigc poem 月 --form qilv --tones strict --pattern zeqi-rhymed --model uer/gpt2-chinese-poem\n\n"
    "  aigc poem --check chunwang.txt --form wulv --rhymes pingshui\n\n"
    "  aigc poem --check my_haiku.txt --form haiku\n\n"
    "Forms: free, haiku, tanka, limerick, couplet, quatrain, sonnet (English); wujue, qijue, wulv, qilv "
    "(Chinese regulated verse, with a 平仄 pattern), gujue (古绝, no tonal pattern).\n\n"
    f"{o.EXIT_CODES_HELP} With --check: 0 the poem fits, 1 it does not."
)
MAX_CANDIDATES = 256


class RhymeBook(str, Enum):
    xinyun = "xinyun"
    pingshui = "pingshui"


class Tones(str, Enum):
    strict = "strict"
    relaxed = "relaxed"
    off = "off"


class Meter(str, Enum):
    iambic = "iambic"
    off = "off"


class PoemDecoding(str, Enum):
    """The decodings a constrained poem can use (greedy has one answer, contrastive ignores the form's ranking)."""

    sample = "sample"
    beam = "beam"


@o.with_model()
@o.with_settings(
    "num_sequences", "decoding", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "seed",
    help={
        "num_sequences": "Poems to print.",
        "decoding": "sample (the candidates are sampled) or beam.",
        "num_beams": "Beams for --decoding beam.",
        "top_k": "Keep the k most likely allowed tokens (default 50).",
        "seed": "Random seed.",
    },
    choices={"decoding": PoemDecoding},
)
def command(  # long only in its option declarations (Typer reads them from the signature); the body is short
    spec: ModelSpec,
    settings: GenerationSettings,
    topic: Annotated[Optional[str], typer.Argument(help="What the poem is about.", show_default=False, metavar="TOPIC")] = None,
    form_name: Annotated[Optional[str], typer.Option("--form", help="Poem form (default: haiku, or wujue for a Chinese topic).", metavar="FORM")] = None,
    candidates: Annotated[
        Optional[int], typer.Option(help="Constrained poems to sample; the best -n by the model's own score are kept (default max(4, -n)).")
    ] = None,
    lines: Annotated[Optional[int], typer.Option(help="Lines (free form).")] = None,
    syllables: Annotated[Optional[str], typer.Option(help="Syllables per line, e.g. 5,7,5 or 8-9 for all lines.", metavar="N,N,...")] = None,
    rhyme_scheme: Annotated[Optional[str], typer.Option(help="Rhyme scheme, e.g. ABAB ('.' for an unrhymed line).", metavar="SCHEME")] = None,
    acrostic: Annotated[Optional[str], typer.Option(help="Chinese forms: each line starts with the next character (藏头诗).", metavar="CHARS")] = None,
    rhymes: Annotated[
        RhymeBook, typer.Option(help="Chinese rhyme book: xinyun (中华新韵, modern pinyin) or pingshui (平水韵, classical poems).")
    ] = RhymeBook.xinyun,
    tones: Annotated[
        Optional[Tones],
        typer.Option(
            help="Regulated Chinese forms' 平仄: strict (every position), relaxed (default: 一三五不论, never 孤平 or 三平尾) or off.",
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        Optional[str],
        typer.Option(
            help="Regulated Chinese forms: fix the 平仄 pattern: pingqi, pingqi-rhymed, zeqi or zeqi-rhymed (平起/仄起, first line rhymed or not; default: any).",
            metavar="PATTERN",
        ),
    ] = None,
    meter: Annotated[
        Optional[Meter],
        typer.Option(help="English forms of fixed syllable counts: iambic (default for sonnet and couplet) or off.", show_default=False),
    ] = None,
    annotate: Annotated[bool, typer.Option(help="Show syllables or characters per line, the rhyme key, and 平/仄 or stress marks.")] = False,
    template: Annotated[Optional[str], typer.Option(help="Prompt template with $topic and $form.", metavar="FILE")] = None,
    check_path: Annotated[
        Optional[str], typer.Option("--check", help="Check an existing poem (file or '-') against --form instead of writing one.", metavar="FILE")
    ] = None,
    output_format: OutputFormat = OutputFormat.auto,
) -> None:
    """Write poems whose form (lines, syllables, rhyme) is guaranteed by constrained decoding."""
    from aigc_cli.apps.poetics import has_cjk, resolve_form

    if form_name is None:
        form_name = "wujue" if topic and has_cjk(topic) else "haiku"
    form = resolve_form(form_name, syllables, rhyme_scheme, lines)
    if acrostic is not None and (form.language != "zh" or len(acrostic) != form.lines):
        raise UsageError(f"--acrostic: needs a Chinese form and one character per line ({form.lines} for {form.name})")
    tones_value, meter_value = _verse_rules(form, tones, pattern, meter)
    streams = Streams()
    if check_path is not None:
        _check(check_path, form, acrostic, rhymes.value, tones_value, pattern, meter_value, annotate, output_format, streams)
    if not topic or not topic.strip():
        raise UsageError("no topic: aigc poem TOPIC --form FORM (or --check FILE)")
    candidates = candidates if candidates is not None else max(4, settings.num_sequences)
    if candidates < settings.num_sequences:
        raise UsageError(f"--candidates ({candidates}) must be at least -n ({settings.num_sequences})")
    if candidates > MAX_CANDIDATES:
        raise UsageError(f"--candidates: at most {MAX_CANDIDATES} (got {candidates})")
    from aigc_cli.engine.seeds import run_seed

    settings = dataclasses.replace(settings, seed=run_seed(settings.seed)).resolved()
    from aigc_cli.apps.poem import write_poems
    from aigc_cli.apps.prompts import load_prompt

    prompt_template = load_prompt(template or f"poem-{form.language}.txt", "--template")
    engine = o.load_engine(spec, Messages(streams))
    poems = write_poems(engine, topic, form, settings, candidates, prompt_template, acrostic, rhymes.value, tones_value, pattern, meter_value)
    render_poems(streams, output_format, poems, f"{form.name} on {topic}", annotate, {"model": engine.name, "form": form.name, "topic": topic})


def _verse_rules(form: Form, tones: Tones | None, pattern: str | None, meter: Meter | None) -> tuple[str, str]:
    """--tones, --pattern and --meter checked against the form: (tones, meter) to use."""
    from aigc_cli.apps.poetics import METER_FORMS
    from aigc_cli.apps.tonal import parse_pattern

    if tones is not None and not form.regulated:
        raise UsageError(f"--tones: only for the regulated Chinese forms wujue, qijue, wulv, qilv (not {form.name})")
    if pattern is not None:
        if not form.regulated:
            raise UsageError(f"--pattern: only for the regulated Chinese forms wujue, qijue, wulv, qilv (not {form.name})")
        if tones is Tones.off:
            raise UsageError("--pattern: needs --tones strict or relaxed (got --tones off)")
        parse_pattern(pattern)
    if meter is not None and form.name not in METER_FORMS:
        raise UsageError(f"--meter: only for English forms of fixed syllable counts ({', '.join(METER_FORMS)}), not {form.name}")
    return (tones or Tones.relaxed).value, meter.value if meter is not None else form.meter


def _check(
    path: str,
    form: Form,
    acrostic: str | None,
    rhymes: str,
    tones: str,
    pattern: str | None,
    meter: str,
    annotate: bool,
    fmt: OutputFormat,
    streams: Streams,
) -> None:
    """`--check FILE`: the poem's lines, counts and rhymes; exit 0 if it fits, 1 if not."""
    from aigc_cli.apps.poetics import check

    report = check(read_text(path, "--check"), form, acrostic, rhymes, tones, pattern, meter)
    rows = [
        {"line": n, "text": r.text, "count": r.count, "rhyme": r.rhyme, "marks": r.marks, "estimated": list(r.estimated)}
        for n, r in enumerate(report.lines, start=1)
    ]
    columns = ["line", "text", "count", "rhyme"] + (["marks", "estimated"] if annotate else [])
    verdict = "fits" if report.ok else "does not fit"
    render_rows(streams, fmt, columns, rows, title=f"{form.name}: {verdict}" + (f" ({report.pattern})" if report.pattern else ""))
    for problem in report.problems:
        Messages(streams).error(problem)
    raise typer.Exit(0 if report.ok else 1)
