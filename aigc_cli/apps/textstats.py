"""Measures of a set of generated texts (`aigc stats`), kept in bounded memory as texts stream in:
distinct-n (distinct n-grams over all n-grams of a group), self-BLEU as Texygen computes it with
nltk (computed here in linear time) over a seeded sample, the repeated n-gram rate within each text, the length distribution, and (given a
model) mean log-probability and perplexity; per prompt and overall. No torch here."""

from __future__ import annotations

import json
import math
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

DISTINCT_N = (1, 2, 3)
BLEU_N = (2, 3, 4)
REP_N = (2, 3, 4)
UNITS = ("auto", "word", "char", "token")


@dataclass
class Item:
    """One text to measure: its line in the input, its prompt (generate's records), its text."""

    line: int
    text: str
    prompt: str | None = None


def parse_items(lines: Iterable[tuple[int, str | None, str | None]], fmt: str = "auto") -> Iterator[Item | dict[str, Any]]:
    """Items from (line number, text or None, problem) lines: aigc generate's JSONL records (their
    `text`, grouped by `prompt`), or plain text, one item per non-empty line. `fmt` "auto" decides on
    the first non-empty line (a JSON object: JSONL). A bad line becomes an error record."""
    for number, text, problem in lines:
        if text is None:
            yield {"line": number, "error": {"code": "invalid_utf8", "message": problem or "not valid UTF-8"}}
            continue
        if not text.strip():
            continue
        if fmt == "auto":
            fmt = "jsonl" if text.lstrip().startswith("{") else "lines"
        if fmt == "lines":
            yield Item(number, text)
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            yield {"line": number, "error": {"code": "invalid_json", "message": f"not a JSON object ({exc.args[0].split(':')[0]})"}}
            continue
        if not isinstance(record, dict):
            yield {"line": number, "error": {"code": "invalid_record", "message": "not a JSON object"}}
        elif "error" in record and "text" not in record:
            yield {"line": number, "error": {"code": "error_record", "message": "an error record of the input (skipped)"}}
        elif not isinstance(record.get("text"), str):
            yield {"line": number, "error": {"code": "invalid_record", "message": 'no "text" string'}}
        elif record.get("prompt") is not None and not isinstance(record["prompt"], str):
            yield {"line": number, "error": {"code": "invalid_record", "message": '"prompt" is not a string'}}
        else:
            yield Item(number, record["text"], record.get("prompt"))


def _cjk(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return name.startswith(("CJK ", "HIRAGANA", "KATAKANA")) or "IDEOGRAPH" in name


def unit_of(text: str) -> str:
    """"char" for Chinese and Japanese text (at least half its non-space characters are Han or
    kana), else "word"."""
    chars = [c for c in text if not c.isspace()]
    return "char" if chars and sum(map(_cjk, chars)) * 2 >= len(chars) else "word"


def units(text: str, unit: str, tokenize: Callable[[str], Sequence[Any]] | None = None) -> tuple[str, list[Any]]:
    """(the unit used, the text's units): whitespace words, non-space characters, or tokens."""
    if unit == "auto":
        unit = unit_of(text)
    if unit == "word":
        return unit, text.split()
    if unit == "char":
        return unit, [c for c in text if not c.isspace()]
    if tokenize is None:
        raise ValueError("token units need a tokenizer")
    return unit, list(tokenize(text))


def ngrams(seq: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def self_bleu(texts: Sequence[Sequence[Any]], orders: Sequence[int] = BLEU_N) -> list[float] | None:
    """Texygen's self-BLEU: each text as the hypothesis against all the others as references, BLEU
    as nltk's `sentence_bleu` computes it with uniform weights and `SmoothingFunction().method1`,
    averaged over the texts; one figure per n-gram order. None with fewer than two texts.

    nltk counts every reference's n-grams again for each hypothesis: N^2 work, minutes for 500
    texts. The same figures come from each n-gram's two largest counts over all texts (the clip
    for a hypothesis is the largest count among the others: the first unless the hypothesis holds
    it, then the second) and the sorted lengths, in time linear in the texts' n-grams."""
    if len(texts) < 2:
        return None
    top = max(orders)
    counts = [[Counter(ngrams(t, n)) for n in range(1, top + 1)] for t in texts]
    best: list[dict[tuple[Any, ...], tuple[int, int, int]]] = [{} for _ in range(top)]  # gram -> (best, its text, second)
    for j, per_order in enumerate(counts):
        for k, grams in enumerate(per_order):
            table = best[k]
            for gram, c in grams.items():
                b, owner, second = table.get(gram, (0, -1, 0))
                if c > b:
                    table[gram] = (c, j, b)
                elif c > second:
                    table[gram] = (b, owner, c)
    lengths = [len(t) for t in texts]
    sums = [0.0] * len(orders)
    for i, per_order in enumerate(counts):
        fractions = []
        for k, grams in enumerate(per_order):
            matched = 0
            for gram, c in grams.items():
                b, owner, second = best[k][gram]
                matched += min(c, second if owner == i else b)
            fractions.append((matched, max(1, sum(grams.values()))))
        if fractions[0][0] == 0:  # no word in common with any other text: nltk's 0 for every order
            continue
        hyp = lengths[i]
        closest = min((abs(r - hyp), r) for j, r in enumerate(lengths) if j != i)[1]
        bp = 1.0 if hyp > closest else math.exp(1 - closest / hyp)
        # method1: a precision with no match becomes epsilon (0.1) over its count
        p = [num / den if num else 0.1 / den for num, den in fractions]
        for o, n in enumerate(orders):
            sums[o] += bp * math.exp(math.fsum((1.0 / n) * math.log(p_i) for p_i in p[:n] if p_i > 0))
    return [s / len(texts) for s in sums]


@dataclass
class Group:
    """The running measures of one group of texts (a prompt's, or all of them)."""

    name: str
    prompt: str | None
    bleu_sample: int
    seed: int
    texts: int = 0
    unit_names: set[str] = field(default_factory=set)
    distinct: dict[int, set[tuple[Any, ...]]] = field(default_factory=lambda: {n: set() for n in DISTINCT_N})
    totals: dict[int, int] = field(default_factory=lambda: {n: 0 for n in DISTINCT_N})
    rep_sums: dict[int, float] = field(default_factory=lambda: {n: 0.0 for n in REP_N})
    rep_texts: dict[int, int] = field(default_factory=lambda: {n: 0 for n in REP_N})
    lengths: Counter[int] = field(default_factory=Counter)
    sample: list[list[Any]] = field(default_factory=list)
    logprob: float = 0.0
    scored_tokens: int = 0
    _rng: random.Random | None = None

    def add(self, unit: str, seq: list[Any]) -> None:
        self.texts += 1
        self.unit_names.add(unit)
        for n in DISTINCT_N:
            grams = ngrams(seq, n)
            self.distinct[n].update(grams)
            self.totals[n] += len(grams)
        for n in REP_N:
            grams = ngrams(seq, n)
            if grams:  # Welleck et al. 2019's seq-rep-n: the share of a text's n-grams that repeat an earlier one
                self.rep_sums[n] += 1 - len(set(grams)) / len(grams)
                self.rep_texts[n] += 1
        self.lengths[len(seq)] += 1
        self._keep(seq)

    def _keep(self, seq: list[Any]) -> None:
        """Reservoir sampling (Vitter's algorithm R), seeded: a uniform sample of the group's texts
        whatever its size, without knowing the size in advance."""
        if len(self.sample) < self.bleu_sample:
            self.sample.append(seq)
            return
        if self._rng is None:
            self._rng = random.Random(f"{self.seed}:{self.name}")
        j = self._rng.randrange(self.texts)
        if j < self.bleu_sample:
            self.sample[j] = seq

    def add_logprob(self, total: float, tokens: int) -> None:
        self.logprob += total
        self.scored_tokens += tokens

    def result(self, with_model: bool) -> dict[str, Any]:
        row: dict[str, Any] = {"group": self.name, "prompt": self.prompt, "texts": self.texts}
        row["unit"] = "+".join(sorted(self.unit_names)) or None
        for n in DISTINCT_N:
            row[f"distinct_{n}"] = len(self.distinct[n]) / self.totals[n] if self.totals[n] else None
        bleu = self_bleu(self.sample)
        values: list[float | None] = list(bleu) if bleu is not None else [None] * len(BLEU_N)
        for n, value in zip(BLEU_N, values):
            row[f"self_bleu_{n}"] = value
        row["self_bleu"] = row["self_bleu_4"]
        row["bleu_texts"] = len(self.sample) if bleu is not None else 0
        row["bleu_sampled"] = self.texts > len(self.sample)
        for n in REP_N:
            row[f"rep_{n}"] = self.rep_sums[n] / self.rep_texts[n] if self.rep_texts[n] else None
        row.update(_lengths(self.lengths))
        if with_model:
            mean = self.logprob / self.scored_tokens if self.scored_tokens else None
            row["mean_logprob"] = mean
            row["perplexity"] = math.exp(-mean) if mean is not None else None
            row["scored_tokens"] = self.scored_tokens
        return row


def _lengths(counts: Counter[int]) -> dict[str, Any]:
    """Mean, min, median, 90th percentile (nearest rank) and max of the texts' lengths in units."""
    total = sum(counts.values())
    if not total:
        return {"length_mean": None, "length_min": None, "length_median": None, "length_p90": None, "length_max": None}
    ordered = sorted(counts.items())

    def quantile(q: float) -> int:
        rank = max(1, math.ceil(q * total))  # nearest rank
        seen = 0
        for value, count in ordered:
            seen += count
            if seen >= rank:
                return value
        return ordered[-1][0]

    return {
        "length_mean": sum(v * c for v, c in ordered) / total,
        "length_min": ordered[0][0],
        "length_median": quantile(0.5),
        "length_p90": quantile(0.9),
        "length_max": ordered[-1][0],
    }


class Stats:
    """The groups of a run: all texts ("overall") and one per prompt, in the order prompts appear."""

    def __init__(self, unit: str, bleu_sample: int, seed: int, tokenize: Callable[[str], Sequence[Any]] | None = None) -> None:
        self.unit, self.tokenize = unit, tokenize
        self.bleu_sample, self.seed = bleu_sample, seed
        self.overall = Group("overall", None, bleu_sample, seed)
        self.prompts: dict[str, Group] = {}

    def add(self, item: Item) -> list[Group]:
        """Measure one text; the groups it belongs to (for scores added later)."""
        unit, seq = units(item.text, self.unit, self.tokenize)
        groups = [self.overall]
        if item.prompt is not None:
            if item.prompt not in self.prompts:
                self.prompts[item.prompt] = Group(f"prompt {len(self.prompts) + 1}", item.prompt, self.bleu_sample, self.seed)
            groups.append(self.prompts[item.prompt])
        for g in groups:
            g.add(unit, seq)
        return groups

    def results(self, with_model: bool) -> list[dict[str, Any]]:
        return [self.overall.result(with_model)] + [g.result(with_model) for g in self.prompts.values()]


def text_logprobs(engine: Any, items: Sequence[Item], batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log-probabilities, tokens) of each item's text under the engine's model: the text's
    tokens conditioned on its prompt's as generation saw them (the model's prompt prefix, then the
    prompt), or on the model's start token when there is no prompt; a text that does not fit the
    context after its prompt is scored alone over `aigc score`'s sliding windows."""
    from aigc_cli.engine.scoring import continuation_logprobs, encode_long, perplexity, start_token

    tok = engine.tokenizer
    start = start_token(tok)
    out: list[tuple[float, int] | None] = [None] * len(items)
    pairs, where = [], []
    for i, item in enumerate(items):
        ids = encode_long(tok, item.text).tolist()
        context = (engine.prefix + list(tok.encode(item.prompt, add_special_tokens=False))) if item.prompt else []
        context = context or [start]
        if not ids:
            out[i] = (0.0, 0)
        elif len(context) + len(ids) <= engine.context_length:
            pairs.append((context, ids))
            where.append(i)
        else:
            result = perplexity(engine.lm.model, ids, start, engine.context_length, None, 8, engine.lm.device)
            out[i] = (-result.nll * result.tokens, result.tokens)
    for i, row in zip(where, continuation_logprobs(engine.lm.model, pairs, batch_size, start, engine.lm.device)):
        out[i] = (sum(row), len(row))
    return [x if x is not None else (0.0, 0) for x in out]
