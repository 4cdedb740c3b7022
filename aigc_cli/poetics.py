"""Poetic forms, English syllables and rhymes (CMU dictionary), Chinese rhyme groups (pinyin), and the
checker that says whether a poem fits a form; no torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from aigc_cli.errors import UsageError

CHINESE_MODEL_HINT = "uer/gpt2-chinese-poem"


@dataclass(frozen=True)
class Form:
    """A form: per-line syllable (English) or character (Chinese) ranges, and a rhyme scheme."""

    name: str
    language: str  # "en" | "zh"
    lengths: tuple[tuple[int, int], ...]  # (low, high) per line
    scheme: str = ""  # one letter per line ("." = free); empty = no rhyme
    description: str = ""

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


def _en(name: str, lengths: list[str], scheme: str, description: str) -> Form:
    return Form(name, "en", tuple(_range(x, "--syllables") for x in lengths), scheme, description)


def _zh(name: str, chars: int, lines: int, description: str) -> Form:
    # Even lines rhyme on one group; odd lines are free.
    return Form(name, "zh", tuple((chars, chars) for _ in range(lines)), ".A" * (lines // 2), description)


FORMS: dict[str, Form] = {
    f.name: f
    for f in [
        _en("free", ["5-12"] * 4, "", "free verse: --lines lines of 5-12 syllables"),
        _en("haiku", ["5", "7", "5"], "", "3 lines of 5-7-5 syllables"),
        _en("tanka", ["5", "7", "5", "7", "7"], "", "5 lines of 5-7-5-7-7 syllables"),
        _en("limerick", ["8-9", "8-9", "5-6", "5-6", "8-9"], "AABBA", "5 lines, AABBA"),
        _en("couplet", ["10", "10"], "AA", "2 rhyming lines of 10 syllables"),
        _en("quatrain", ["8"] * 4, "ABAB", "4 lines of 8 syllables, ABAB"),
        _en("sonnet", ["10"] * 14, "ABABCDCDEFEFGG", "Shakespearean: 14 lines of 10 syllables, ABAB CDCD EFEF GG"),
        _zh("wujue", 5, 4, "五言绝句: 4 lines of 5 characters"),
        _zh("qijue", 7, 4, "七言绝句: 4 lines of 7 characters"),
        _zh("wulv", 5, 8, "五言律诗: 8 lines of 5 characters"),
        _zh("qilv", 7, 8, "七言律诗: 8 lines of 7 characters"),
    ]
}


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
    return Form(form.name, form.language, tuple(lengths), scheme, form.description)


# --- English: syllables and rhymes from the CMU pronouncing dictionary ----------------------


@functools.lru_cache(maxsize=1)
def _cmu() -> dict[str, list[str]]:
    import pronouncing

    pronouncing.init_cmu()
    return pronouncing.lookup  # word -> pronunciations


def pronunciation(word: str) -> str | None:
    """The first CMU pronunciation of a word, or None when it is not in the dictionary."""
    prons = _cmu().get(word.lower())
    return prons[0] if prons else None


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


WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
LINE_END_PUNCT = ",.!?;:"
_EN_LINE = re.compile(r"[A-Za-z']+(?: [A-Za-z']+)*[,.!?;:]?")


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


@dataclass
class Report:
    lines: list[LineReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def poem_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def check(text: str, form: Form, acrostic: str | None = None) -> Report:
    """Does `text` fit `form`? Problems name the line."""
    return _check_zh(text, form, acrostic) if form.language == "zh" else _check_en(text, form)


def _check_en(text: str, form: Form) -> Report:
    report = Report()
    lines = poem_lines(text)
    if len(lines) != form.lines:
        report.problems.append(f"{len(lines)} lines, expected {form.lines}")
    for n, line in enumerate(lines, start=1):
        words = WORD_RE.findall(line)
        counts = [syllables(w) for w in words]
        unknown = [w for w, c in zip(words, counts) if c is None]
        count = None if unknown else sum(c for c in counts if c is not None)
        last = words[-1].lower() if words else ""
        report.lines.append(LineReport(line, count, rhyme_key(last) if last else None, last))
        if unknown:
            report.problems.append(f"line {n}: {unknown[0]!r} is not in the pronouncing dictionary")
        elif n <= form.lines:
            lo, hi = form.lengths[n - 1]
            if not lo <= count <= hi:  # type: ignore[operator]
                want = f"{lo}" if lo == hi else f"{lo}-{hi}"
                report.problems.append(f"line {n}: {count} syllables, expected {want}")
        if not _EN_LINE.fullmatch(line):
            report.problems.append(f"line {n}: only words and one line-end punctuation mark are allowed")
    _check_scheme(report, form, lambda r: r.rhyme, lambda r: r.last)
    return report


def _check_scheme(report: Report, form: Form, key_of, word_of) -> None:
    seen: dict[str, tuple[int, str | None, set[str]]] = {}
    for n, line in enumerate(report.lines[: form.lines], start=1):
        letter = form.letter(n - 1)
        if letter == ".":
            continue
        if letter not in seen:
            seen[letter] = (n, key_of(line), {word_of(line)})
            continue
        first, key, words = seen[letter]
        if key is None or key_of(line) != key:
            report.problems.append(f"line {n}: does not rhyme with line {first} ({line.last!r}, {key_of(line)} vs {key})")
        elif word_of(line) in words:
            report.problems.append(f"line {n}: repeats the rhyme {word_of(line)!r}")
        words.add(word_of(line))


def _check_zh(text: str, form: Form, acrostic: str | None) -> Report:
    report = Report()
    lines = poem_lines(text)
    if len(lines) != form.lines:
        report.problems.append(f"{len(lines)} lines, expected {form.lines}")
    for n, line in enumerate(lines, start=1):
        body, mark = line[:-1], line[-1:]
        hanzi = [ch for ch in body if is_hanzi(ch)]
        last = hanzi[-1] if hanzi else ""
        group = hanzi_rhyme(last)[0] if last else None
        report.lines.append(LineReport(line, len(hanzi), group, last))
        expected_mark = "，" if n % 2 else "。"
        if len(hanzi) != len(body):
            report.problems.append(f"line {n}: only hanzi before the final punctuation")
        if n <= form.lines:
            if len(hanzi) != form.lengths[n - 1][0]:
                report.problems.append(f"line {n}: {len(hanzi)} characters, expected {form.lengths[n - 1][0]}")
            if mark != expected_mark:
                report.problems.append(f"line {n}: should end with {expected_mark}")
        if acrostic and n <= len(acrostic) and (not hanzi or hanzi[0] != acrostic[n - 1]):
            report.problems.append(f"line {n}: should start with {acrostic[n - 1]!r} (acrostic)")
    _check_scheme(report, form, lambda r: r.rhyme, lambda r: r.last)
    return report
