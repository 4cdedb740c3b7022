"""平仄 for 近体诗: tone classes of characters in either rhyme book, the four standard patterns of
绝句 and 律诗 (粘 and 对), what each position of a line allows under strict or relaxed rules, and
the checker that names every violation; no torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from aigc_cli.core.errors import UsageError

PING, ZE = "平", "仄"
BOTH = frozenset({PING, ZE})
TONE_MODES = ("strict", "relaxed", "off")

# A line is named by the tone of its second character and of its last one (五言 / 七言).
_LINES = {
    5: {(ZE, ZE): "仄仄平平仄", (PING, PING): "平平仄仄平", (PING, ZE): "平平平仄仄", (ZE, PING): "仄仄仄平平"},
    7: {
        (ZE, ZE): "仄仄平平平仄仄",
        (PING, PING): "平平仄仄仄平平",
        (PING, ZE): "平平仄仄平平仄",
        (ZE, PING): "仄仄平平仄仄平",
    },
}


def other(tone: str) -> str:
    return ZE if tone == PING else PING


@dataclass(frozen=True)
class Pattern:
    """One of the four standard patterns: the first line's second character (平起 or 仄起) and
    whether the first line rhymes (首句入韵)."""

    second: str  # 平 or 仄
    rhymed_first: bool

    @property
    def name(self) -> str:
        return f"{self.second}起首句{'入' if self.rhymed_first else '不入'}韵"

    @property
    def flag(self) -> str:
        return ("pingqi" if self.second == PING else "zeqi") + ("-rhymed" if self.rhymed_first else "")

    def line(self, index: int, chars: int) -> str:
        """The pattern of line `index` (0-based): 对 after an odd line, 粘 after an even one."""
        return line_pattern(chars, second_of(self.second, index), end_of(index, self.rhymed_first))


PATTERNS = tuple(Pattern(s, r) for s in (PING, ZE) for r in (False, True))


def second_of(first_second: str, index: int) -> str:
    """The second character's tone on line `index`: lines 2, 4, ... oppose the line before (对),
    lines 3, 5, ... repeat it (粘), so lines 1, 4, 5, 8 share the first line's tone."""
    return first_second if index % 4 in (0, 3) else other(first_second)


def end_of(index: int, rhymed_first: bool) -> str:
    """Even lines end on the 平 rhyme; odd lines on 仄, except a rhymed first line."""
    return PING if index % 2 == 1 or (index == 0 and rhymed_first) else ZE


def line_pattern(chars: int, second: str, end: str) -> str:
    return _LINES[chars][(second, end)]


def parse_pattern(text: str) -> Pattern:
    """`--pattern`: pingqi, pingqi-rhymed, zeqi, zeqi-rhymed (or 平起, 平起入韵, 仄起, 仄起入韵)."""
    aliases = {p.flag: p for p in PATTERNS} | {p.name: p for p in PATTERNS}
    aliases |= {f"{p.second}起" + ("入韵" if p.rhymed_first else ""): p for p in PATTERNS}
    key = text.strip().lower()
    if key not in aliases:
        raise UsageError(f"--pattern: expected pingqi, pingqi-rhymed, zeqi or zeqi-rhymed (or 平起, 平起入韵, 仄起, 仄起入韵), got {text!r}")
    return aliases[key]


def requirement(pattern: str, pos: int, mode: str, classes: list[frozenset[str]]) -> tuple[frozenset[str], str]:
    """What position `pos` (0-based) of a line with `pattern` allows, and the rule that says so,
    given the tone classes of the characters before it. Positions 2, 4, 6 and the last are fixed;
    strict fixes the others too; relaxed frees 1, 3 (and 5 in 七言, 一三五不论) but never allows
    三平尾 (仄仄仄平平 with a 平 third) nor 孤平 (平平仄仄平 with 仄 first and third)."""
    n = len(pattern)
    core = n - 5  # a 七言 line is two characters before a 五言 one; 孤平 and 三平尾 are rules of that core
    want = frozenset({pattern[pos]})
    if mode == "off":
        return BOTH, ""
    if pos == n - 1:
        return want, "韵脚" if pattern[-1] == PING else "出句仄收"
    if pos % 2 == 1:
        return want, "二四六分明" if pos > 1 else "粘对"
    if mode == "strict":
        return want, "定格"
    tail = pattern[core:]
    if pos == core + 2 and tail == "仄仄仄平平":
        return frozenset({ZE}), "三平尾"
    if pos == core + 2 and tail == "平平仄仄平" and PING not in classes[core]:
        return frozenset({PING}), "孤平"
    return BOTH, ""


# --- tone classes of characters ------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def tone_classes(ch: str, rhymes: str = "xinyun") -> frozenset[str]:
    """平 and/or 仄: every reading of a character. 中华新韵: pypinyin's heteronym readings, tones 1-2
    平, 3-4 仄. 平水韵: the character's groups in aigc's 平水韵 table (so 入声 characters are 仄 whatever
    their modern tone), looked up as written and in traditional form; a character the table lacks
    falls back to its modern tones."""
    if rhymes == "pingshui":
        from aigc_cli.apps.lexicon import _pingshui, _traditional

        table = _pingshui()
        found = frozenset(t for ch2 in {ch, _traditional(ch)} for _, t in table.get(ch2, []))
        if found:
            return found
    return frozenset(PING if t in (1, 2) else ZE for t in _modern_tones(ch) if t in (1, 2, 3, 4))


def _modern_tones(ch: str) -> list[int]:
    from pypinyin import Style, pinyin

    readings = pinyin(ch, style=Style.TONE3, heteronym=True, strict=True, neutral_tone_with_five=True)[0]
    return [int(r[-1]) for r in readings if r[-1:].isdigit()]


def readings_shown(ch: str, rhymes: str) -> str:
    """The readings a violation names: pinyin (中华新韵) or 平水韵 groups with their tone."""
    if rhymes == "pingshui":
        from aigc_cli.apps.lexicon import _pingshui, _traditional

        groups = [f"{g}{t}" for ch2 in dict.fromkeys([ch, _traditional(ch)]) for g, t in _pingshui().get(ch2, [])]
        if groups:
            return "/".join(dict.fromkeys(groups))
    from pypinyin import Style, pinyin

    return "/".join(pinyin(ch, style=Style.TONE, heteronym=True, strict=True)[0])


def _shown(classes: frozenset[str]) -> str:
    return "/".join(sorted(classes, reverse=True)) or "unknown"  # 平/仄


# --- the checker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    line: int  # 1-based
    position: int  # 1-based
    char: str
    reading: str
    actual: str  # the tone it has (or, for a 多音字, the one its line needs)
    expected: str  # 平 or 仄
    rule: str

    def __str__(self) -> str:
        return f"line {self.line}, position {self.position}: {self.char} ({self.reading}) is {self.actual}, expected {self.expected} ({self.rule})"


def check_tones(  # kept whole: one Viterbi over the lines' second tones, its two cost functions beside it
    lines: list[str], rhymes: str, mode: str, rhymes_first: bool | None, pattern: Pattern | None = None
) -> tuple[Pattern | None, list[Violation]]:
    """The pattern that fits `lines` (each exactly 5 or 7 hanzi) best and its violations.

    Each line's second character sets its own 粘/对 tone (chosen among its readings to break the
    fewest rules), so a line that breaks 粘 is reported once, not with every line after it.
    `rhymes_first`: whether the first line's last character rhymes with the even lines (首句入韵
    is possible only then); `pattern` fixes the pattern, as `--pattern` does."""
    if mode == "off" or not lines:
        return None, []
    chars = len(lines[0])
    classes = [[tone_classes(ch, rhymes) for ch in line] for line in lines]

    def line_cost(k: int, second: str, end: str) -> list[Violation]:
        pat = line_pattern(chars, second, end)
        out = []
        for p, ch in enumerate(lines[k]):
            if p == 1:
                continue  # the second character is judged by 粘 and 对 below
            allowed, rule = requirement(pat, p, mode, classes[k])
            if not classes[k][p] & allowed:
                out.append(Violation(k + 1, p + 1, ch, readings_shown(ch, rhymes), _shown(classes[k][p]), _shown(allowed), rule))
        return out

    def seconds(k: int) -> list[tuple[str, list[Violation]]]:
        """The tones line k's second character may take; a character of unknown tone takes either, reported."""
        ch = lines[k][1]
        if classes[k][1]:
            return [(t, []) for t in (PING, ZE) if t in classes[k][1]]
        return [(t, [Violation(k + 1, 2, ch, readings_shown(ch, rhymes) or "?", "unknown", t, "unknown tone")]) for t in (PING, ZE)]

    # A first line that rhymes is read as 首句入韵 when both readings fit equally well.
    firsts = sorted((p for p in PATTERNS if pattern is None or p == pattern), key=lambda p: p.rhymed_first != bool(rhymes_first))
    best: tuple[int, Pattern, list[Violation]] | None = None
    for start in firsts:
        unrhymed = []
        if start.rhymed_first and rhymes_first is False:  # 首句入韵 needs a first line that rhymes
            ch = lines[0][-1]
            unrhymed = [Violation(1, chars, ch, readings_shown(ch, rhymes), "not the rhyme", "the rhyme", "首句入韵")]
        # Viterbi over each line's own second tone, with 粘/对 between neighbours.
        states: dict[str, list[Violation]] = {}
        for second, unknown in seconds(0):
            link = []
            if second != start.second:
                ch = lines[0][1]
                link = [Violation(1, 2, ch, readings_shown(ch, rhymes), second, start.second, "--pattern")]
            states[second] = unrhymed + unknown + link + line_cost(0, second, end_of(0, start.rhymed_first))
        if pattern is None:
            states = {s: vs for s, vs in states.items() if s == start.second}
            if not states:
                continue
        for k in range(1, len(lines)):
            new: dict[str, list[Violation]] = {}
            for second, unknown in seconds(k):
                here = line_cost(k, second, end_of(k, start.rhymed_first))
                options = []
                for prev, vs in states.items():
                    want = other(prev) if k % 2 == 1 else prev
                    link = []
                    if second != want:
                        ch = lines[k][1]
                        link = [Violation(k + 1, 2, ch, readings_shown(ch, rhymes), second, want, "对" if k % 2 == 1 else "粘")]
                    options.append(vs + unknown + link + here)
                new[second] = min(options, key=len)
            states = new
        found = min(states.values(), key=len)
        if best is None or len(found) < best[0]:
            best = (len(found), start, found)
    if best is None:
        return None, []
    return best[1], sorted(best[2], key=lambda v: (v.line, v.position))
