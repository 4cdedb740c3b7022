"""Poetic forms, English syllables and rhymes (CMU dictionary), Chinese rhyme groups (pinyin), and the
checker that says whether a poem fits a form; no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from aigc_cli.apps.lexicon import _cmu, _pingshui, _traditional, pronunciation, stress_variants, syllable_options, verse_prons
from aigc_cli.apps.tonal import tone_classes
from aigc_cli.core.errors import UsageError

if TYPE_CHECKING:
    from aigc_cli.apps.meter import MeterFault

CHINESE_MODEL_HINT = "uer/gpt2-chinese-poem"


@dataclass(frozen=True)
class Form:
    """A form: per-line syllable (English) or character (Chinese) ranges, and a rhyme scheme."""

    name: str
    language: str  # "en" | "zh"
    lengths: tuple[tuple[int, int], ...]  # (low, high) per line
    scheme: str = ""  # one letter per line ("." = free); empty = no rhyme
    description: str = ""
    regulated: bool = False  # 近体诗: a tonal pattern (平仄) and 平声 rhymes
    meter: str = "off"  # English: the default --meter (iambic for sonnet and couplet)

    @property
    def lines(self) -> int:
        return len(self.lengths)

    def letter(self, line: int) -> str:
        return self.scheme[line] if self.scheme else "."


def _range(text: str, flag: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise UsageError(f"{flag}: expected a number or a range like 8-9 (got {text!r})")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= 40:
        raise UsageError(f"{flag}: need 1 <= low <= high <= 40 (got {text!r})")
    return lo, hi


def _en(name: str, lengths: list[str], scheme: str, description: str, meter: str = "off") -> Form:
    return Form(name, "en", tuple(_range(x, "--syllables") for x in lengths), scheme, description, meter=meter)


def _zh(name: str, chars: int, lines: int, description: str, regulated: bool = True) -> Form:
    # Even lines rhyme on one group; odd lines are free (a regulated first line may rhyme too).
    return Form(name, "zh", tuple((chars, chars) for _ in range(lines)), ".A" * (lines // 2), description, regulated)


FORMS: dict[str, Form] = {
    f.name: f
    for f in [
        _en("free", ["5-12"] * 4, "", "free verse: --lines lines of 5-12 syllables"),
        _en("haiku", ["5", "7", "5"], "", "3 lines of 5-7-5 syllables"),
        _en("tanka", ["5", "7", "5", "7", "7"], "", "5 lines of 5-7-5-7-7 syllables"),
        _en("limerick", ["8-9", "8-9", "5-6", "5-6", "8-9"], "AABBA", "5 lines, AABBA"),
        _en("couplet", ["10", "10"], "AA", "2 rhyming lines of 10 syllables, iambic", "iambic"),
        _en("quatrain", ["8"] * 4, "ABAB", "4 lines of 8 syllables, ABAB"),
        _en("sonnet", ["10"] * 14, "ABABCDCDEFEFGG", "Shakespearean: 14 lines of iambic pentameter, ABAB CDCD EFEF GG", "iambic"),
        _zh("wujue", 5, 4, "五言绝句: 4 lines of 5 characters, 平仄 pattern"),
        _zh("qijue", 7, 4, "七言绝句: 4 lines of 7 characters, 平仄 pattern"),
        _zh("wulv", 5, 8, "五言律诗: 8 lines of 5 characters, 平仄 pattern"),
        _zh("qilv", 7, 8, "七言律诗: 8 lines of 7 characters, 平仄 pattern"),
        _zh("gujue", 5, 4, "古绝: 4 lines of 5 characters, no tonal pattern, rhyming on 平 or 仄", regulated=False),
    ]
}


# English forms of fixed syllable counts that may take iambic meter (--meter); limerick, haiku and
# tanka are left out (their meter is not iambic), and free verse has no fixed count.
METER_FORMS = ("couplet", "quatrain", "sonnet")


def resolve_form(
    name: str, syllables: str | None = None, rhyme_scheme: str | None = None, lines: int | None = None
) -> Form:
    """A named form with --lines (free only), --syllables and --rhyme-scheme overrides, checked."""
    if name not in FORMS:
        raise UsageError(f"--form: unknown form {name!r} (choose from {', '.join(FORMS)})")
    form = FORMS[name]
    if form.language == "zh" and (syllables or rhyme_scheme or lines):
        raise UsageError("--syllables/--rhyme-scheme/--lines: Chinese forms fix their lines, characters and rhymes")
    lengths = list(form.lengths)
    if lines is not None:
        if form.name != "free" and lines != form.lines:
            raise UsageError(f"--lines: the {name} form has {form.lines} lines (use --form free for any number)")
        if not 1 <= lines <= 40:
            raise UsageError(f"--lines: must be 1 to 40 (got {lines})")
        lengths = [lengths[0]] * lines
    if syllables is not None:
        parts = [_range(x, "--syllables") for x in syllables.split(",")]
        if len(parts) == 1:
            lengths = parts * len(lengths)
        elif form.name == "free" and lines is None:
            lengths = parts
        elif len(parts) != len(lengths):
            raise UsageError(f"--syllables: {len(parts)} lines given, the form has {len(lengths)}")
        else:
            lengths = parts
    scheme = form.scheme[: len(lengths)] if form.scheme else ""
    if rhyme_scheme is not None:
        scheme = re.sub(r"\s+", "", rhyme_scheme).upper()
        if not re.fullmatch(r"[A-Z.]+", scheme):
            raise UsageError(f"--rhyme-scheme: letters A-Z, or . for an unrhymed line (got {rhyme_scheme!r})")
        if len(scheme) != len(lengths):
            raise UsageError(f"--rhyme-scheme: {len(scheme)} letters for {len(lengths)} lines")
    return Form(form.name, form.language, tuple(lengths), scheme, form.description, form.regulated, form.meter)


# --- English: syllables and rhymes from the CMU pronouncing dictionary ----------------------


def syllables(word: str) -> int | None:
    pron = pronunciation(word)
    return None if pron is None else sum(ch.isdigit() for ch in pron)


def rhyme_key(word: str) -> str | None:
    """The stress-less rhyming part of the first pronunciation: 'night' -> 'AY T'."""
    import pronouncing

    pron = pronunciation(word)
    if pron is None:
        return None
    return re.sub(r"\d", "", pronouncing.rhyming_part(pron))


def rhyme_keys(word: str) -> set[str]:
    """Rhyme keys of every pronunciation of a word."""
    import pronouncing

    return {re.sub(r"\d", "", pronouncing.rhyming_part(p)) for p in verse_prons(word)}


def estimate_syllables(word: str) -> int:
    """Syllables of a word outside the dictionary (the fewest of apps.meter's estimates: a compound
    of dictionary words, or vowel groups less a silent e)."""
    from aigc_cli.apps.meter import estimated_counts

    return min(estimated_counts(word))


def _spelled_rhyme(word: str) -> str:
    """A rhyme key from spelling (last vowel group to the end), for words outside the dictionary."""
    m = re.search(r"[aeiouy]+[^aeiouy]*$", word.lower())
    return "~" + (m.group(0) if m else word.lower())


WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
LINE_END_PUNCT = ",.!?;:"


# --- Chinese: rhyme groups (中华新韵) and tones from pypinyin ----------------------------------

_GROUPS = {
    "麻": "a ia ua",
    "波": "o e uo",
    "皆": "ie ve ue",
    "开": "ai uai",
    "微": "ei ui uei",
    "豪": "ao iao",
    "尤": "ou iu iou",
    "寒": "an ian uan van",
    "文": "en in un uen vn",
    "唐": "ang iang uang",
    "庚": "eng ing ong iong ueng",
    "齐": "i er v",
    "支": "",  # -i after zh ch sh r z c s
    "姑": "u",
}
_FINAL_GROUP = {final: group for group, finals in _GROUPS.items() for final in finals.split()}
_RETROFLEX = {"zh", "ch", "sh", "r", "z", "c", "s"}


def is_hanzi(ch: str) -> bool:
    return len(ch) == 1 and ("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")


def has_cjk(text: str) -> bool:
    return any(is_hanzi(ch) for ch in text)


@functools.lru_cache(maxsize=8192)
def hanzi_rhyme(ch: str) -> tuple[str | None, int | None]:
    """(中华新韵 group, tone 1-4 or None) of a character's first reading."""
    from pypinyin import Style, pinyin

    final = pinyin(ch, style=Style.FINALS, strict=True)[0][0]
    initial = pinyin(ch, style=Style.INITIALS, strict=True)[0][0]
    tone3 = pinyin(ch, style=Style.FINALS_TONE3, strict=True, neutral_tone_with_five=True)[0][0]
    if not final or final == ch:
        return None, None
    group = "支" if final == "i" and initial in _RETROFLEX else _FINAL_GROUP.get(final)
    tone = int(tone3[-1]) if tone3 and tone3[-1].isdigit() else None
    return group, tone


def is_level_tone(tone: int | None) -> bool:
    """平声 in modern Mandarin: tones 1 and 2."""
    return tone in (1, 2)


# --- the checker -----------------------------------------------------------------------------


@dataclass
class LineReport:
    text: str
    count: int | None  # syllables (en) or hanzi (zh); None when a word is unknown
    rhyme: str | None  # rhyme key (en) or group (zh) of the last word / character
    last: str = ""  # the rhyming word or character
    keys: frozenset[str] = frozenset()  # every rhyme key / (group, tone class) the last word can take
    estimated: tuple[str, ...] = ()  # words outside the dictionary, counted from their spelling
    marks: str = ""  # 平/仄 per character (zh, 〇 for a character that may be either), stress per syllable (en)


@dataclass
class Report:
    lines: list[LineReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    pattern: str | None = None  # the 平仄 pattern a regulated poem follows, e.g. 仄起首句不入韵

    @property
    def ok(self) -> bool:
        return not self.problems


RHYME_BOOKS = ("xinyun", "pingshui")


def poem_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def check(
    text: str,
    form: Form,
    acrostic: str | None = None,
    rhymes: str = "xinyun",
    tones: str = "relaxed",
    pattern: str | None = None,
    meter: str | None = None,
) -> Report:
    """Does a poem (written by people or generated) fit `form`? Problems name the line.

    Regulated Chinese forms (绝句, 律诗) also follow a 平仄 pattern under `tones` (strict, relaxed or
    off; see apps.tonal), `pattern` fixing one (`--pattern`); English forms with `meter` "iambic"
    (default: the form's own, iambic for sonnet and couplet) are checked for iambic meter.

    The checker reads poems as they are printed: English lines may carry any punctuation, quotes,
    dashes and contractions; every dictionary pronunciation of a word counts, and words outside
    the dictionary are counted from their spelling (`LineReport.estimated`); a rhyme word may
    repeat (Lear's limericks do). Chinese verse lines end at ，。！？； so a couplet may share a
    printed line; rhyme characters share a group of the rhyme book (`rhymes`: 中华新韵 or 平水韵)
    and one tone class (平 or 仄: 古绝 such as 春晓 rhyme on 仄声)."""
    if form.language == "zh":
        return _check_zh(text, form, acrostic, rhymes, tones, pattern)
    return _check_en(text, form, form.meter if meter is None else meter)


def _check_en(text: str, form: Form, meter: str = "off") -> Report:
    from aigc_cli.apps.meter import check_line, estimated_counts

    report = Report()
    lines = poem_lines(text.replace("\u2019", "'").replace("\u2018", "'"))
    if len(lines) != form.lines:
        report.problems.append(f"{len(lines)} lines, expected {form.lines}")
    for n, line in enumerate(lines, start=1):
        found = list(WORD_RE.finditer(line))
        words = [m.group(0) for m in found]
        breaks = {k for k in range(1, len(found)) if re.search(r"[,.;:!?\u2014\u2013()-]", line[found[k - 1].end() : found[k].start()])}
        options = [syllable_options(w) or set(estimated_counts(w)) for w in words]
        totals = {0}
        for opts in options:
            totals = {t + o for t in totals for o in opts}
        lo, hi = form.lengths[n - 1] if n <= form.lines else (0, 10**6)
        fitting = sorted(t for t in totals if lo <= t <= hi)
        count = fitting[0] if fitting else min(totals, key=lambda t: min(abs(t - lo), abs(t - hi)))
        faults: list[MeterFault] = []
        marks = ""
        if meter == "iambic" and n <= form.lines and words:
            metered, faults, marks = check_line(words, lo, hi, breaks=breaks)
            if metered is not None:
                count, fitting = metered, [metered]  # a feminine ending counts one more
        last = words[-1].lower() if words else ""
        sounded = rhyme_keys(last)
        # Spelling rhymes too (alack/back, love/prove, dimm'd/untrimm'd): the eye rhymes and rhymes of
        # older pronunciation that real verse has.
        keys = frozenset(sounded | ({_spelled_rhyme(last)} if last else set()))
        estimated = tuple(w for w in words if syllable_options(w) is None)
        shown = min(sounded) if sounded else min(keys) if keys else None
        report.lines.append(LineReport(line, count, shown, last, keys, estimated, marks))
        if not words:
            report.problems.append(f"line {n}: has no words")
        elif n <= form.lines and not fitting:
            want = f"{lo}" if lo == hi else f"{lo}-{hi}"
            report.problems.append(f"line {n}: {count} syllables, expected {want}")
        report.problems += [str(dataclasses.replace(f, line=n)) for f in faults]
    _check_scheme(report, form, repeats=True)
    return report


def _check_scheme(report: Report, form: Form, repeats: bool) -> None:
    """Lines of one letter rhyme: their key sets share a key (and, unless `repeats`, no rhyme word repeats)."""
    seen: dict[str, tuple[int, frozenset[str], set[str]]] = {}
    for n, line in enumerate(report.lines[: form.lines], start=1):
        letter = form.letter(n - 1)
        if letter == ".":
            continue
        if letter not in seen:
            seen[letter] = (n, line.keys, {line.last})
            continue
        first, keys, words = seen[letter]
        shared = keys & line.keys
        if not shared:
            first_rhyme = report.lines[first - 1].rhyme
            report.problems.append(f"line {n}: does not rhyme with line {first} ({line.last!r}, {line.rhyme} vs {first_rhyme})")
        elif not repeats and line.last in words:
            report.problems.append(f"line {n}: repeats the rhyme {line.last!r}")
        else:
            seen[letter] = (first, shared, words | {line.last})


_VERSE_END = "，。！？；"
_QUOTES = "「」『』“”‘’《》〈〉（）()\"'"


def verse_lines(text: str) -> list[str]:
    """Chinese verse lines, each with its closing mark: printed lines split after ，。！？； so that
    "床前明月光，疑是地上霜。" is two lines."""
    out = []
    for printed in poem_lines(text):
        printed = "".join(ch for ch in printed if ch not in _QUOTES and not ch.isspace())
        out += [m.group(0) for m in re.finditer(f"[^{_VERSE_END}]+[{_VERSE_END}]?", printed)]
    return out


def _check_zh(text: str, form: Form, acrostic: str | None, rhymes: str, tones: str = "off", pattern: str | None = None) -> Report:
    report = Report()
    lines = verse_lines(text)
    if len(lines) != form.lines:
        report.problems.append(f"{len(lines)} lines, expected {form.lines}")
    for n, line in enumerate(lines, start=1):
        body = line.rstrip(_VERSE_END)
        hanzi = [ch for ch in body if is_hanzi(ch)]
        last = hanzi[-1] if hanzi else ""
        keys = frozenset(f"{g}/{t}" for g, t in rhyme_readings(last, rhymes)) if last else frozenset()
        report.lines.append(LineReport(line, len(hanzi), _group_shown(last, rhymes), last, keys))
        if len(hanzi) != len(body):
            report.problems.append(f"line {n}: only hanzi before the final punctuation")
        if n <= form.lines and len(hanzi) != form.lengths[n - 1][0]:
            report.problems.append(f"line {n}: {len(hanzi)} characters, expected {form.lengths[n - 1][0]}")
        if acrostic and n <= len(acrostic) and (not hanzi or hanzi[0] != acrostic[n - 1]):
            report.problems.append(f"line {n}: should start with {acrostic[n - 1]!r} (acrostic)")
    _check_scheme(report, form, repeats=False)
    for reported in report.lines:
        reported.marks = "".join(_mark(tone_classes(ch, rhymes)) for ch in reported.text if is_hanzi(ch))
    shaped = len(lines) == form.lines and all(r.count == lo for r, (lo, _) in zip(report.lines, form.lengths))
    if form.regulated and tones != "off" and shaped and all(len(text.rstrip(_VERSE_END)) == r.count for text, r in zip(lines, report.lines)):
        _check_pattern(report, form, rhymes, tones, pattern)
    return report


def _mark(classes: frozenset[str]) -> str:
    return next(iter(classes)) if len(classes) == 1 else "〇" if classes else "？"


def _check_pattern(report: Report, form: Form, rhymes: str, tones: str, pattern: str | None) -> None:
    """平仄 (apps.tonal), once lines, characters and rhymes are right; 首句入韵 only if the first line
    rhymes with the others."""
    from aigc_cli.apps.tonal import check_tones, parse_pattern

    fixed = parse_pattern(pattern) if pattern else None
    hanzi = ["".join(ch for ch in line.text if is_hanzi(ch)) for line in report.lines]
    shared = frozenset.intersection(*(line.keys for line in report.lines[1::2]))
    rhymed_first = any(k.endswith("/平") and k in shared for k in report.lines[0].keys)
    found, violations = check_tones(hanzi, rhymes, tones, rhymed_first, fixed)
    report.pattern = found.name if found else None
    report.problems += [str(v) for v in violations]


def _group_shown(ch: str, rhymes: str) -> str | None:
    readings = rhyme_readings(ch, rhymes) if ch else []
    return readings[0][0] if readings else None


def rhyme_readings(ch: str, rhymes: str = "xinyun") -> list[tuple[str, str]]:
    """(rhyme group, tone class 平 or 仄) of every reading of a character in a rhyme book."""
    if rhymes == "pingshui":
        return _pingshui().get(ch) or _pingshui().get(_traditional(ch), [])
    from pypinyin import Style, pinyin

    out = []
    for reading in pinyin(ch, style=Style.TONE3, heteronym=True, strict=True, neutral_tone_with_five=True)[0]:
        group, tone = _xinyun(reading)
        if group is not None and (group, "平" if is_level_tone(tone) else "仄") not in out:
            out.append((group, "平" if is_level_tone(tone) else "仄"))
    return out


def _xinyun(reading: str) -> tuple[str | None, int | None]:
    """中华新韵 group and tone of one pinyin reading in TONE3 style ("guang1")."""
    from pypinyin.style._utils import get_finals, get_initials

    tone = int(reading[-1]) if reading[-1:].isdigit() else None
    plain = reading.rstrip("012345").replace("v", "ü")
    initial = get_initials(plain, strict=True)
    final = get_finals(plain, strict=True).replace("ü", "v")
    group = "支" if final == "i" and initial in _RETROFLEX else _FINAL_GROUP.get(final)
    return group, tone


