"""Iambic meter for English verse: stress patterns of words from the CMU dictionary's stress marks,
syllable estimates for words outside it (compounds, silent e), and a loose iambic check that names
the misplaced syllable; no torch.

The loose rule, after Halle and Keyser's stress maximum: the primary-stressed syllable of a word of
two or more syllables stands on an even position (2, 4, 6, ...), except on position 1 (an initial
trochee: "Coral is far more red"). Monosyllables take either position: function words ("the",
"and", "thou") are unstressed or stressed as the line needs, and a stressed monosyllable on an odd
position is a spondee, which real iambic verse is full of. A line may add an eleventh, unstressed
syllable after its last stress (a feminine ending).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Monosyllabic function words, free to take either position (the rule keeps them free; content
# monosyllables are free too, so this list only names them in reports).
FUNCTION_WORDS = frozenset(
    """a an the and but or nor for so yet if as than that this these those what which who whom whose
    when where while though at by in of on to up with from into onto upon out off down than through
    i me my mine we us our you your thou thee thy thine he him his she her it its they them their
    is am are was were be been being do does did doth dost have has had hath hast shall shalt will wilt
    should would could can may might must not no o oh all some such each own too then there here""".split()
)


def stress_patterns(word: str) -> set[str] | None:
    """Stress digits per syllable ("010" for "tomorrow") of every CMU pronunciation of a word, as
    verse may say it (poetics.stress_variants: heav'n, batt'ring); None when unknown."""
    from aigc_cli.apps.lexicon import stress_variants, verse_prons

    prons = verse_prons(word)
    if not prons:
        return None
    return {v for p in prons for v in stress_variants(p)}


@functools.lru_cache(maxsize=4096)
def estimated_counts(word: str) -> frozenset[int]:
    """Syllable counts of a word outside the dictionary: a compound of two dictionary words
    ("whitecaps" = white + caps: 2) takes their sum; otherwise vowel groups in the spelling less a
    silent final e ("-e", "-es", "-ed" after a consonant that does not make a syllable), at least 1."""
    from aigc_cli.apps.lexicon import syllable_options

    w = word.lower().replace("'", "")
    found: set[int] = set()
    for i in range(2, len(w) - 1):
        left, right = syllable_options(w[:i]), syllable_options(w[i:])
        if left and right and len(w[:i]) > 2 and len(w[i:]) > 2:
            found |= {a + b for a in left for b in right}
    if found:
        return frozenset(found)
    return frozenset({spelled_syllables(w)})


def spelled_syllables(w: str) -> int:
    groups = len(re.findall(r"[aeiouy]+", w))
    if groups > 1 and re.search(r"[^aeiouy](e|es|ed)$", w) and not re.search(r"([^aeiouy]l(e|es|ed)|[td]ed|[cgsxz]es|ee)$", w):
        groups -= 1
    return max(groups, 1)


@dataclass(frozen=True)
class MeterFault:
    line: int
    syllable: int  # 1-based position in the line
    word: str
    stress: str  # the word's stress digits, the faulty syllable in capitals: "de VOUR ing" -> "0[1]0"

    def __str__(self) -> str:
        return f"line {self.line}, syllable {self.syllable}: {self.word!r} ({self.stress}) puts its stress on an odd position (iambic)"


def _options(word: str) -> list[tuple[str, bool]]:
    """(stress digits or '?' per syllable, known) for every reading of a word."""
    pats = stress_patterns(word)
    if pats:
        return [(p, True) for p in sorted(pats)]
    return [("?" * n, False) for n in sorted(estimated_counts(word))]


def _misplaced(pattern: str, start: int, phrase_initial: bool = False) -> list[int]:
    """0-based syllables of a word starting at line position `start` (0-based) whose primary stress
    falls on an odd (weak) position. Never faulted: monosyllables and unknown words; a stress next to
    another stress of its word ("sometime", "almost": not a stress maximum); the first syllable of a
    word that starts the line or follows a mark of punctuation (an inverted foot after a break)."""
    if len(pattern) < 2:
        return []
    out = []
    for i, d in enumerate(pattern):
        if d != "1" or (start + i + 1) % 2 == 0:
            continue
        if i == 0 and (phrase_initial or start == 0):
            continue
        if (i > 0 and pattern[i - 1] in "12") or (i + 1 < len(pattern) and pattern[i + 1] in "12"):
            continue
        out.append(i)
    return out


def check_line(words: list[str], lo: int, hi: int, feminine: bool = True, breaks: set[int] | None = None) -> tuple[int | None, list[MeterFault], str]:
    """The syllable count (lo..hi, or hi + 1 with a feminine ending) that reads the line as iambic
    with the fewest misplaced stresses, those faults (line numbers 0; the caller sets them), and the
    reading's marks (/ stressed, x unstressed, \\ secondary, ? unknown, one per syllable, a space
    between words). `breaks`: indices of words that follow a mark of punctuation.
    (None, [], "") when no reading has a fitting count."""
    breaks = breaks or set()
    # DP over words: syllables so far -> (faults, the words' chosen patterns)
    states: dict[int, tuple[int, list[tuple[str, str, int, bool]]]] = {0: (0, [])}
    for k, w in enumerate(words):
        new: dict[int, tuple[int, list[tuple[str, str, int, bool]]]] = {}
        for pos, (cost, path) in states.items():
            for pat, _ in _options(w):
                end = pos + len(pat)
                if end > hi + 1:
                    continue
                c = cost + len(_misplaced(pat, pos, k in breaks))
                if end not in new or c < new[end][0]:
                    new[end] = (c, path + [(w, pat, pos, k in breaks)])
        states = new
    best: tuple[int, int, list[tuple[str, str, int, bool]]] | None = None
    for total, (cost, path) in states.items():
        ok_count = lo <= total <= hi or (feminine and total == hi + 1 and path and _unstressed_end(path[-1]))
        if ok_count and (best is None or (cost, total > hi) < (best[1], best[0] > hi)):  # ties: no feminine ending
            best = (total, cost, path)
    if best is None:
        return None, [], ""
    faults = []
    for w, pat, pos, brk in best[2]:
        for i in _misplaced(pat, pos, brk):
            shown = pat[:i] + "[" + pat[i] + "]" + pat[i + 1 :]
            faults.append(MeterFault(0, pos + i + 1, w, shown))
    return best[0], faults, " ".join(_marks(w, pat) for w, pat, _, _ in best[2])


def _marks(word: str, pattern: str) -> str:
    if len(pattern) == 1 and pattern != "?":
        return "x" if word.lower() in FUNCTION_WORDS else "/"
    return pattern.replace("1", "/").replace("0", "x").replace("2", "\\")


def _unstressed_end(last: tuple[str, str, int, bool]) -> bool:
    """A feminine ending: the eleventh syllable is unstressed (0 in a longer word, or a function word)."""
    w, pat = last[0], last[1]
    return (len(pat) > 1 and pat[-1] in "0?") or (len(pat) == 1 and w.lower() in FUNCTION_WORDS)
