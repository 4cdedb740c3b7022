"""Poems whose form is guaranteed by constrained decoding, then reranked by the unconstrained model.

A `FormConstraint` logits processor masks every token that would break the form. Its state is
recomputed from `input_ids` at each step, so it works with batches, -n and beam search. English:
only whole dictionary words (one token each) with a known pronunciation, a newline, one line-end
punctuation mark and EOS; a word is allowed only if the line can still be finished within its
syllable budget with a word that satisfies the rhyme scheme, so the allowed set is never empty and
every poem ends within `token_budget(form)` tokens; with iambic meter, a word of two or more
syllables only where its stresses land on even syllables (and only words that can end an iambic line
in rhyme groups). Chinese: one hanzi per token, exact characters per line, ，/。 after odd/even lines,
even lines on one level-toned rhyme group with no repeated rhyme character, optional acrostic; in
regulated verse, at each position only the characters some still-open 平仄 pattern allows
(apps.tonal). Where nothing fits, a usage error names the line and position.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from string import Template
from typing import Any

import torch

from aigc_cli.core.errors import RecordError, UsageError
from aigc_cli.apps.poetics import (
    CHINESE_MODEL_HINT,
    LINE_END_PUNCT,
    WORD_RE,
    Form,
    check,
    hanzi_rhyme,
    is_hanzi,
    is_level_tone,
    rhyme_readings,
    pronunciation,
    rhyme_key,
    syllables,
)
from aigc_cli.apps.meter import FUNCTION_WORDS
from aigc_cli.apps.tonal import tone_classes

_ENDS = {",", ".", "!", "?", ";"}
_SINGLE_LETTER_WORDS = {"a", "i"}


def is_chinese_tokenizer(tok: Any) -> bool:
    """A BERT-style tokenizer with one token per hanzi, as Chinese GPT-2 models use."""
    ids = tok.encode("山水月", add_special_tokens=False)
    return tok.convert_ids_to_tokens(ids) == ["山", "水", "月"]


def token_budget(form: Form) -> int:
    """Most tokens a poem can take: a word has at least one syllable; punctuation, newline, EOS."""
    if form.language == "zh":
        return sum(lo + 1 for lo, _ in form.lengths) + 1
    return sum(hi + 2 for _, hi in form.lengths) + 1


# --- English --------------------------------------------------------------------------------


@dataclass
class EnglishVocab:
    """What each token of an English tokenizer can be in a poem."""

    size: int
    space_word: torch.Tensor  # " word": a whole dictionary word after a space
    start_word: torch.Tensor  # "Word": a whole dictionary word with no space (line start)
    newline: torch.Tensor
    punct: torch.Tensor
    eos: int
    syl: torch.Tensor  # syllables of the word, 0 for non-words
    key: torch.Tensor  # rhyme key index, -1 for none
    word: torch.Tensor  # lowercase word index, -1 for non-words
    iamb: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    # iamb[p]: tokens that keep iambic meter when they start after a number of syllables of parity p:
    # every primary stress of a longer word, and a stressed monosyllable that is not a function word,
    # on an even position; function words and non-words always (stricter than apps.meter's check)
    keys: dict[str, int] = field(default_factory=dict)  # rhyme key -> index used in `key`
    words: dict[str, int] = field(default_factory=dict)  # lowercase word -> index used in `word`
    # Derived masks and ids, kept with the vocabulary (a cache on the class would keep every
    # instance alive in a long-running process).
    _finals: dict[tuple[int, int, bool], torch.Tensor] = field(default_factory=dict, repr=False)
    _tokens: dict[str, int] = field(default_factory=dict, repr=False)

    def word_token(self, word: str) -> int:
        """A token that writes this word (EOS when none)."""
        if word not in self._tokens:
            ids = (self.word == self.words[word]).nonzero() if word in self.words else None
            self._tokens[word] = int(ids[0]) if ids is not None and len(ids) else self.eos
        return self._tokens[word]

    @classmethod
    def build(cls, tok: Any) -> EnglishVocab:
        size = len(tok)
        texts = tok.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
        space_word = torch.zeros(size, dtype=torch.bool)
        start_word = torch.zeros(size, dtype=torch.bool)
        newline = torch.zeros(size, dtype=torch.bool)
        punct = torch.zeros(size, dtype=torch.bool)
        syl = torch.zeros(size, dtype=torch.int8)  # small: the masks are computed every step
        key = torch.full((size,), -1, dtype=torch.long)
        word_index = torch.full((size,), -1, dtype=torch.long)
        iamb = (torch.ones(size, dtype=torch.bool), torch.ones(size, dtype=torch.bool))
        keys: dict[str, int] = {}
        words: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text == "\n":
                newline[i] = True
            elif text in _ENDS:
                punct[i] = True
            m = re.fullmatch(r"( ?)([A-Za-z]+)", text)
            if not m:
                continue
            w = m.group(2).lower()
            if len(w) == 1 and w not in _SINGLE_LETTER_WORDS:
                continue
            n = syllables(w)
            k = rhyme_key(w)
            if not n:
                continue
            (space_word if m.group(1) else start_word)[i] = True
            syl[i] = n
            stresses = [j for j, ch in enumerate(c for c in pronunciation(w) or "" if c.isdigit()) if ch == "1"]
            if n > 1:  # starting after s syllables, stress j lands on position s + j + 1, which must be even
                iamb[0][i] = all(j % 2 == 1 for j in stresses)
                iamb[1][i] = all(j % 2 == 0 for j in stresses)
            elif w not in FUNCTION_WORDS and stresses:  # a stressed monosyllable: even positions only
                iamb[0][i] = False
            word_index[i] = words.setdefault(w, len(words))
            if k:
                key[i] = keys.setdefault(k, len(keys))
        eos = tok.eos_token_id
        if eos is None:
            raise UsageError("--model: the tokenizer has no end-of-text token, needed to end a poem")
        return cls(size, space_word, start_word, newline, punct, eos, syl, key, word_index, iamb, keys, words)

    def iambic_end(self) -> torch.Tensor:
        """Words that keep iambic meter when they end a line of an even number of syllables: a word
        of n syllables then starts after a number of parity n."""
        return torch.where(self.syl.long() % 2 == 0, self.iamb[0], self.iamb[1])

    def final_ok_new(self, more: int, max_syl: int, iambic: bool = False) -> torch.Tensor:
        """Words that may end the first line of a rhyme group which needs `more` later lines: their
        rhyme class must hold `more` other words of at most `max_syl` syllables (that can end an
        iambic line, with `iambic`)."""
        if (more, max_syl, iambic) not in self._finals:
            self._finals[(more, max_syl, iambic)] = self._final_ok_new(more, max_syl, iambic)
        return self._finals[(more, max_syl, iambic)]

    def _final_ok_new(self, more: int, max_syl: int, iambic: bool) -> torch.Tensor:
        fits = self.space_word & (self.syl <= _int8(max_syl)) & (self.key >= 0)
        if iambic:
            fits &= self.iambic_end()
        counts: dict[int, set[int]] = {}
        for k, w in zip(self.key[fits].tolist(), self.word[fits].tolist()):
            counts.setdefault(k, set()).add(w)
        good = torch.zeros(len(self.keys) + 1, dtype=torch.bool)
        for k, ws in counts.items():
            good[k] = len(ws) >= more + 1
        return (self.key >= 0) & good[self.key.clamp(min=0)]


def _int8(n: int) -> int:
    """n clamped to int8, for comparisons with `EnglishVocab.syl` (torch would wrap 200 to -56)."""
    return max(-128, min(127, n))


@dataclass
class _Line:
    """Where a row stands in its current line, recomputed from its text."""

    index: int
    syllables: int
    words: list[str]
    ended: bool  # a line-end punctuation mark was written
    finals: list[str]  # last word of each completed line


def _english_state(text: str) -> _Line:
    lines = text.split("\n")
    current = lines[-1]
    words = WORD_RE.findall(current)
    finals = []
    for line in lines[:-1]:
        ws = WORD_RE.findall(line)
        finals.append(ws[-1].lower() if ws else "")
    count = sum(syllables(w) or 0 for w in words)
    return _Line(len(lines) - 1, count, [w.lower() for w in words], current.rstrip()[-1:] in LINE_END_PUNCT and bool(current.strip()), finals)


class FormConstraint:
    """Masks every token that would break `form`; see the module docstring."""

    def __init__(
        self,
        tok: Any,
        form: Form,
        prompt_width: int,
        acrostic: str | None = None,
        rhymes: str = "xinyun",
        tones: str = "relaxed",
        pattern: str | None = None,
        meter: str | None = None,
    ) -> None:
        if prompt_width < 0:
            raise ValueError("prompt_width must be >= 0")
        self.tok, self.form, self.width, self.acrostic = tok, form, prompt_width, acrostic
        self.rhymes, self.tones = rhymes, tones
        if form.language == "zh":
            self.zh = chinese_vocab(tok, rhymes)
            self._allowed = self._allowed_zh
            self.regulated = form.regulated and tones != "off"
            self._patterns_cache: dict[tuple[tuple[int, int], ...], tuple[Any, ...]] = {}
            self._tone_masks: dict[tuple[Any, ...], torch.Tensor] = {}
            self.patterns = self._prepare_patterns(pattern) if self.regulated else ()
        else:
            self.en = english_vocab(tok)
            self._allowed = self._allowed_en
            self.iambic = (form.meter if meter is None else meter) == "iambic"
            if self.iambic and any(lo != hi or lo % 2 for lo, hi in form.lengths):
                raise UsageError(
                    f"--meter iambic: needs an even, fixed number of syllables per line (the {form.name} has "
                    f"{', '.join(str(lo) if lo == hi else f'{lo}-{hi}' for lo, hi in form.lengths)}); use --meter off"
                )
            self._requirements: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, int]] = {}
            self._masks: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids[:, self.width :].tolist()
        allowed = torch.stack([self._allowed(row) for row in rows]).to(scores.device)
        out = scores.masked_fill(~allowed, -float("inf"))
        emptied = torch.isneginf(out).all(dim=-1)
        if emptied.any():  # other processors (no-repeat-ngram, ...) removed every allowed token
            out[emptied] = torch.zeros_like(out[emptied]).masked_fill(~allowed[emptied], -float("inf"))
        return out

    # English
    def _requirement(self, line: int, finals: list[str]) -> tuple[tuple[str, ...], torch.Tensor, int]:
        """Which words may end line `line`, given the rhyme scheme and earlier lines' final words:
        (the earlier finals it depends on, the mask, the fewest syllables of a word in it after a
        space). Computed once per distinct (line, earlier finals)."""
        letter = self.form.letter(line)
        earlier = tuple(finals[j] for j in range(line) if letter != "." and self.form.letter(j) == letter)
        key = (line, earlier)
        if key not in self._requirements:
            final_ok = self._compute_requirement(line, letter, earlier)
            space = self.en.space_word & final_ok
            shortest = int(self.en.syl[space].min()) if space.any() else self.form.lengths[line][1] + 1
            self._requirements[key] = (final_ok, shortest)
        return (earlier, *self._requirements[key])

    def _compute_requirement(self, line: int, letter: str, earlier: tuple[str, ...]) -> torch.Tensor:
        ok = self._compute_rhyme(line, letter, earlier)
        return ok & self.en.iambic_end() if self.iambic else ok

    def _compute_rhyme(self, line: int, letter: str, earlier: tuple[str, ...]) -> torch.Tensor:
        v, form = self.en, self.form
        if letter == ".":
            return v.space_word | v.start_word
        if not earlier:
            later = [j for j in range(line + 1, form.lines) if form.letter(j) == letter]
            if not later:
                return v.space_word | v.start_word
            return v.final_ok_new(len(later), min(form.lengths[j][1] for j in later), self.iambic)
        key_index = v.keys.get(rhyme_key(earlier[0]) or "", -2)
        used = torch.tensor([v.words[w] for w in earlier if w in v.words] or [-2])
        return (v.key == key_index) & ~torch.isin(v.word, used)

    def _allowed_en(self, row: list[int]) -> torch.Tensor:
        """The mask for a row, from its state (line, syllables so far, the rhyme requirement, whether
        its last word may end the line): rows and steps in the same state share one computation
        (measured, sonnet with 4 candidates: ~3 ms -> ~1 ms per step)."""
        v, form = self.en, self.form
        st = _english_state(self.tok.decode([t for t in row if t != v.eos], clean_up_tokenization_spaces=False))
        if st.index >= form.lines or st.ended:
            key: tuple[Any, ...] = (st.index, st.ended)
            earlier: tuple[str, ...] = ()
            final_ok, shortest, may_end = None, 0, False
        else:
            lo, hi = form.lengths[st.index]
            earlier, final_ok, shortest = self._requirement(st.index, st.finals)
            may_end = bool(st.words) and lo <= st.syllables <= hi and bool(final_ok[self._word_token(st.words[-1])])
            key = (st.index, st.ended, st.syllables, bool(st.words), earlier, may_end)
        if key not in self._masks:
            self._masks[key] = self._mask_en(st, final_ok, shortest, may_end)
        return self._masks[key]

    def _mask_en(self, st: _Line, final_ok: torch.Tensor | None, shortest: int, may_end: bool) -> torch.Tensor:
        v, form = self.en, self.form
        allowed = torch.zeros(v.size, dtype=torch.bool)
        last_line = st.index >= form.lines - 1
        if st.index >= form.lines or (st.ended and last_line):
            allowed[v.eos] = True
            return allowed
        if st.ended:
            allowed |= v.newline
            return allowed
        assert final_ok is not None
        lo, hi = form.lengths[st.index]
        words = v.start_word if not st.words else v.space_word
        room = hi - st.syllables  # syllables this line still has
        can_go_on = v.syl <= _int8(room - shortest)  # a rhyming word still fits after this one
        can_end_here = (v.syl >= _int8(lo - st.syllables)) & final_ok
        if self.iambic:  # a word whose stresses would fall on odd positions is masked
            fits = v.iamb[st.syllables % 2]
            if st.syllables == 0:  # an initial trochee: a stressed monosyllable may open the line
                fits = fits | (v.syl == 1)
            words = words & fits
        allowed |= words & (v.syl <= _int8(room)) & (can_go_on | can_end_here)
        if may_end:
            allowed |= v.punct
            if last_line:
                allowed[v.eos] = True
            else:
                allowed |= v.newline
        if not allowed.any():  # cannot happen when the form is feasible for this vocabulary
            raise UsageError(
                f"--form {form.name}: this model's vocabulary cannot complete line {st.index + 1} at syllable {st.syllables + 1}"
                + (" (try --meter off)" if self.iambic else "")
            )
        return allowed

    def _word_token(self, word: str) -> int:
        return self.en.word_token(word)

    # Chinese
    def _allowed_zh(self, row: list[int]) -> torch.Tensor:
        v, form = self.zh, self.form
        allowed = torch.zeros(v.size, dtype=torch.bool)
        lines: list[list[int]] = [[]]
        for t in row:
            if t in (v.comma, v.period):
                lines.append([])
            elif v.hanzi[t]:
                lines[-1].append(t)
        line, pos = len(lines) - 1, len(lines[-1])
        finals = [self.tok.convert_ids_to_tokens(chars[-1]) if chars else "" for chars in lines[:-1]]
        if line >= form.lines:
            allowed[v.eos if v.eos is not None else v.period] = True
            return allowed
        length = form.lengths[line][0]
        if pos == length:
            allowed[v.comma if line % 2 == 0 else v.period] = True
            return allowed
        allowed |= v.hanzi
        if pos == 0 and self.acrostic and line < len(self.acrostic):
            allowed &= v.id_of(self.acrostic[line])
        patterns = self._open_patterns(lines) if self.regulated else ()
        rhymed_first = bool(patterns) and all(p.rhymed_first for p in patterns) and line > 0
        if self.regulated:
            allowed &= self._tone_mask(patterns, line, pos, lines[-1])
        if pos == length - 1 and form.letter(line) != ".":
            rhymed = [finals[j] for j in range(line) if form.letter(j) != "." or (j == 0 and rhymed_first)]
            if rhymed:
                first = v.index.get(rhymed[0])
                group = int(v.group[first]) if first is not None else -1
                allowed &= v.level & (v.group == group) if group >= 0 else v.level & False
                for ch in rhymed:
                    allowed &= ~v.id_of(ch)
            else:
                allowed &= v.rhyme_start(self._rhymed_lines(rhymed_first))
        if not allowed.any():
            raise UsageError(self._unfillable(line, pos, patterns))
        return allowed

    def _rhymed_lines(self, rhymed_first: bool) -> int:
        return sum(1 for j in range(self.form.lines) if self.form.letter(j) != ".") + int(rhymed_first)

    def _line_patterns(self, pattern: Any, line: int) -> str:
        return pattern.line(line, self.form.lengths[line][0])

    def _open_patterns(self, lines: list[list[int]]) -> tuple[Any, ...]:
        """The 平仄 patterns every character written so far fits (any of its readings); the first
        line's second character commits to 平起 or 仄起, its last to 首句入韵 or not (入韵 whenever
        that character can start the rhyme)."""
        from aigc_cli.apps.tonal import requirement

        v = self.zh
        seq = tuple((k, t) for k, chars in enumerate(lines) for t in chars)
        n = len(seq)
        while n and seq[:n] not in self._patterns_cache:  # rows grow a token a step: the parent is cached
            n -= 1
        out = self._patterns_cache[seq[:n]] if n else self.patterns
        for i in range(n, len(seq)):
            k, t = seq[i]
            chars = [c for kk, c in seq[: i + 1] if kk == k]
            p = len(chars) - 1
            classes = [v.classes[c] for c in chars]
            out = tuple(pat for pat in out if classes[p] & requirement(self._line_patterns(pat, k), p, self.tones, classes)[0])
            if k == 0 and p == self.form.lengths[0][0] - 1:
                can_rhyme = bool(v.rhyme_start(self._rhymed_lines(True))[t])
                rhymed = tuple(pat for pat in out if pat.rhymed_first and can_rhyme)
                out = rhymed or tuple(pat for pat in out if not pat.rhymed_first)
            self._patterns_cache[seq[: i + 1]] = out
        return out

    def _tone_mask(self, patterns: tuple[Any, ...], line: int, pos: int, chars: list[int]) -> torch.Tensor:
        from aigc_cli.apps.tonal import requirement

        v = self.zh
        classes = [v.classes[t] for t in chars]
        key = (line, pos, patterns, tuple(classes))
        if key in self._tone_masks:
            return self._tone_masks[key]
        mask = torch.zeros(v.size, dtype=torch.bool)
        for pat in patterns:
            allowed, _ = requirement(self._line_patterns(pat, line), pos, self.tones, classes)
            part = v.tone_mask(allowed)
            if line == 0 and pos == self.form.lengths[0][0] - 1 and pat.rhymed_first:
                part = part & v.rhyme_start(self._rhymed_lines(True))
            mask |= part
        self._tone_masks[key] = mask
        return mask

    def _unfillable(self, line: int, pos: int, patterns: tuple[Any, ...]) -> str:
        from aigc_cli.apps.tonal import requirement

        where = f"--form {self.form.name}: no character in this model's vocabulary can fill line {line + 1}, position {pos + 1}"
        if not self.regulated:
            return where
        needs = sorted({t for pat in patterns for t in requirement(self._line_patterns(pat, line), pos, self.tones, [frozenset()] * pos)[0]})
        return f"{where} (it needs {'/'.join(needs) or 'a tone no open pattern allows'}{', the rhyme' if pos == self.form.lengths[line][0] - 1 else ''}; try --tones relaxed or another --pattern)"

    def _prepare_patterns(self, pattern: str | None) -> tuple[Any, ...]:
        """The patterns decoding may follow: all four, or the one --pattern names; those an acrostic's
        characters cannot start under --tones strict, or whose rhymed first line the vocabulary cannot
        rhyme, are left out; none left is a usage error naming the line and position."""
        from aigc_cli.apps.tonal import PATTERNS, parse_pattern, readings_shown, requirement

        v = self.zh
        out = (parse_pattern(pattern),) if pattern else PATTERNS
        if not v.rhyme_start(self._rhymed_lines(True)).any():
            out = tuple(p for p in out if not p.rhymed_first) or out
        if self.acrostic:
            for k, ch in enumerate(self.acrostic[: self.form.lines]):
                classes = v.classes[v.index[ch]] if ch in v.index else frozenset()
                fits = tuple(p for p in out if classes & requirement(self._line_patterns(p, k), 0, self.tones, [])[0])
                if not fits:
                    needs = "/".join(sorted({t for p in out for t in requirement(self._line_patterns(p, k), 0, self.tones, [])[0]}))
                    raise UsageError(
                        f"--acrostic: {ch!r} ({readings_shown(ch, self.rhymes)}) cannot start line {k + 1}: position 1 needs {needs} "
                        f"under --tones {self.tones}{' --pattern ' + pattern if pattern else ''} (try --tones relaxed)"
                    )
                out = fits
        return out


@dataclass
class ChineseVocab:
    size: int
    hanzi: torch.Tensor
    level: torch.Tensor  # 平声 (tones 1, 2)
    group: torch.Tensor  # rhyme group index, -1 for none
    groups: list[str]
    comma: int
    period: int
    eos: int | None
    index: dict[str, int]
    ping: torch.Tensor  # hanzi with a 平 reading in the rhyme book
    ze: torch.Tensor  # hanzi with a 仄 reading
    classes: list[frozenset[str]]  # per token: the tone classes of its readings (empty for non-hanzi)
    _starts: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def tone_mask(self, allowed: frozenset[str]) -> torch.Tensor:
        """Hanzi with a reading in `allowed` (平, 仄 or both)."""
        if len(allowed) == 2:
            return self.ping | self.ze
        return self.ping if "平" in allowed else self.ze

    def id_of(self, ch: str) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool)
        if ch in self.index:
            mask[self.index[ch]] = True
        return mask

    def rhyme_start(self, needed: int) -> torch.Tensor:
        """Level-toned characters whose group has at least `needed` level-toned characters."""
        if needed not in self._starts:
            self._starts[needed] = self._rhyme_start(needed)
        return self._starts[needed]

    def _rhyme_start(self, needed: int) -> torch.Tensor:
        counts = torch.bincount(self.group[self.level & (self.group >= 0)], minlength=len(self.groups) + 1)
        good = counts >= needed
        return self.level & (self.group >= 0) & good[self.group.clamp(min=0)]


@functools.lru_cache(maxsize=4)
def chinese_vocab(tok: Any, rhymes: str = "xinyun") -> ChineseVocab:
    """The vocabulary's hanzi with their rhyme group and whether they can rhyme (平声): for 中华新韵
    the first pinyin reading's final and tone; for 平水韵 the character's first 平 reading."""
    size = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(size)))
    hanzi = torch.tensor([is_hanzi(t) for t in tokens])
    level = torch.zeros(size, dtype=torch.bool)
    group = torch.full((size,), -1, dtype=torch.long)
    groups: list[str] = []
    for i, t in enumerate(tokens):
        if hanzi[i]:
            if rhymes == "pingshui":
                g = next((group for group, tone in rhyme_readings(t, rhymes) if tone == "平"), None)
                level[i] = g is not None
            else:
                g, tone = hanzi_rhyme(t)
                level[i] = is_level_tone(tone)
            if g is not None:
                if g not in groups:
                    groups.append(g)
                group[i] = groups.index(g)
    index = {t: i for i, t in enumerate(tokens) if hanzi[i]}
    ids = {t: i for i, t in enumerate(tokens)}
    if "，" not in ids or "。" not in ids:
        raise UsageError("--model: the Chinese tokenizer lacks ， or 。")
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    classes = [tone_classes(t, rhymes) if hanzi[i] else frozenset() for i, t in enumerate(tokens)]
    ping = torch.tensor(["平" in c for c in classes], dtype=torch.bool)
    ze = torch.tensor(["仄" in c for c in classes], dtype=torch.bool)
    return ChineseVocab(size, hanzi, level, group, groups, ids["，"], ids["。"], eos, index, ping, ze, classes)


@functools.lru_cache(maxsize=4)
def english_vocab(tok: Any) -> EnglishVocab:
    return EnglishVocab.build(tok)


# --- writing poems --------------------------------------------------------------------------


@dataclass
class Poem:
    index: int
    text: str
    lines: list[str]
    counts: list[int | None]
    rhymes: list[str | None]
    score: float  # mean log-probability per token under the unconstrained model
    seed: int
    marks: list[str] = field(default_factory=list)  # 平/仄 per character, or stress per syllable
    pattern: str | None = None  # the 平仄 pattern of a regulated Chinese poem


def check_language(engine: Any, topic: str, form: Form) -> None:
    """Never feed hanzi to an English model, nor an English form to a Chinese one."""
    chinese = is_chinese_tokenizer(engine.tokenizer)
    if form.language == "zh" and not chinese:
        raise UsageError(
            f"--form {form.name}: Chinese forms need a Chinese GPT-2 with one token per hanzi "
            f"(e.g. --model {CHINESE_MODEL_HINT}); {engine.name} is an English model"
        )
    if form.language == "en" and chinese:
        raise UsageError(f"--form {form.name}: English forms need an English GPT-2; {engine.name} is a Chinese model")
    if form.language == "en" and any(is_hanzi(ch) for ch in topic):
        raise UsageError(
            f"the topic is Chinese but {engine.name} is an English model: use --model {CHINESE_MODEL_HINT} "
            "with --form wujue, qijue, wulv or qilv"
        )


def render_prompt(template: str, topic: str, form: Form) -> str:
    return Template(template).safe_substitute(topic=topic, form=form.name)


def poem_text(tok: Any, form: Form, token_ids: list[int]) -> str:
    """The poem as lines of text (Chinese: no spaces between characters, a line per mark)."""
    if form.language == "zh":
        chars = "".join(t for t in tok.convert_ids_to_tokens(token_ids) if is_hanzi(t) or t in "，。")
        return re.sub(r"([，。])", "\\1\n", chars).strip()
    return tok.decode(token_ids, clean_up_tokenization_spaces=False).strip()


def _prompt_ids(engine: Any, prompt: str, run: Any, form: Form) -> list[int]:
    """The prompt's ids; a topic the engine refuses is a usage error named as poem's own input
    (poem has no --max-new-tokens)."""
    try:
        return list(engine.encode(prompt, run))
    except RecordError as exc:
        if exc.code != "prompt_too_long":
            raise UsageError(f"the topic: {exc.message}") from None
        raise UsageError(
            f"the topic is too long: with the prompt template it leaves no room in {engine.name}'s context of "
            f"{engine.context_length} tokens for a {form.name} (up to {run.max_new_tokens} tokens)"
        ) from None


def _poem(text: str, report: Any, score: float, seed: int) -> Poem:
    lines = report.lines
    return Poem(
        index=0, text=text, lines=[x.text for x in lines], counts=[x.count for x in lines], rhymes=[x.rhyme for x in lines],
        score=score, seed=seed, marks=[x.marks for x in lines], pattern=report.pattern,
    )


def write_poems(
    engine: Any,
    topic: str,
    form: Form,
    settings: Any,
    candidates: int,
    template: str,
    acrostic: str | None = None,
    rhymes: str = "xinyun",
    tones: str = "relaxed",
    pattern: str | None = None,
    meter: str | None = None,
) -> list[Poem]:
    """Sample `candidates` constrained poems, keep the best `settings.num_sequences` by the
    unconstrained model's mean log-probability per token."""
    import dataclasses

    from aigc_cli.engine.decoding import Decoding
    from aigc_cli.engine.engine import Request
    from aigc_cli.engine.scoring import continuation_logprobs

    check_language(engine, topic, form)
    tok = engine.tokenizer
    if acrostic:
        missing = [ch for ch in acrostic if ch not in chinese_vocab(tok).index]
        if missing:
            raise UsageError(f"--acrostic: {missing[0]!r} is not in the model's vocabulary")
    keep = settings.num_sequences
    n = candidates if settings.decoding is Decoding.sample else max(keep, settings.num_beams or 0)
    run = dataclasses.replace(
        settings,
        num_sequences=n if settings.decoding is Decoding.sample else keep,
        num_beams=max(settings.num_beams or 0, keep) if settings.decoding is Decoding.beam else None,
        max_new_tokens=token_budget(form),
        stop=(),
        ban=(),
    ).resolved()
    prompt = render_prompt(template, topic, form)
    seed = settings.seed
    prompt_ids = _prompt_ids(engine, prompt, run, form)
    FormConstraint(tok, form, 0, acrostic, rhymes, tones, pattern, meter)  # usage errors (acrostic vs pattern) before decoding
    request = Request(id=0, prompt=prompt, settings=run, seed=seed, prompt_ids=tuple(prompt_ids))
    completions = list(
        engine.generate(
            [request], processors=lambda width: [FormConstraint(tok, form, width, acrostic, rhymes, tones, pattern, meter)], logprobs=True
        )
    )
    if all(c.logprobs is not None for c in completions):  # recorded while sampling: no second forward pass
        scores = [c.logprobs for c in completions]
    else:  # beam search records none: score the finished poems
        scores = continuation_logprobs(
            engine.lm.model,
            [(prompt_ids, c.token_ids) for c in completions],
            pad_id=tok.pad_token_id or 0,
            device=engine.lm.device,
        )
    poems = []
    for c, row in zip(completions, scores):
        text = poem_text(tok, form, c.token_ids)
        report = check(text, form, acrostic, rhymes, tones, pattern, meter)
        if not report.ok:  # the constraint guarantees the form; this would be a bug, never shown as a poem
            raise AssertionError(f"constrained poem failed its form: {report.problems[0]}\n{text}")
        poems.append(_poem(text, report, sum(row) / max(len(row), 1), seed))
    poems.sort(key=lambda p: -p.score)
    for i, p in enumerate(poems[:keep]):
        p.index = i
    return poems[:keep]
