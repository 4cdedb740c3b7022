"""The language model as a zero-shot recommender: catalogs, user profiles, PMI ranking, metrics.

score(item) = log P(item | user prompt) - log P(item | neutral prompt), summed over the item's own
tokens (domain-conditional PMI, Holtzman et al. 2021). Item ids are encoded once, apart from any
prompt, so they are identical under every prompt.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import UsageError
from aigc_cli.engine.seeds import run_seed

SAMPLE = "sample"  # --catalog sample / --eval sample: the small data shipped with aigc


class ScoreKind(str, Enum):
    pmi = "pmi"
    loglik = "loglik"
    mean = "mean"


class Aggregate(str, Enum):
    max = "max"
    mean = "mean"


@dataclass(frozen=True)
class Item:
    id: str
    title: str
    description: str = ""
    category: str = ""


@dataclass
class Profile:
    interests: list[str] = field(default_factory=list)
    liked: list[str] = field(default_factory=list)  # titles or ids
    disliked: list[str] = field(default_factory=list)


@dataclass
class Ranked:
    item: Item
    score: float
    per_context: dict[str, float]


# --- catalogs ------------------------------------------------------------------------------

_MIND_NEWS = ["id", "category", "subcategory", "title", "description", "url", "title_entities", "abstract_entities"]


def sample_path(name: str) -> Path:
    return Path(str(resources.files("aigc_cli") / "data" / name))


def load_catalog(path: str) -> list[Item]:
    """Items from JSONL, CSV, TSV (with a header) or MIND's headerless news.tsv."""
    p = sample_path("catalog.jsonl") if path == SAMPLE else Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--catalog {path}: cannot read ({exc})") from None
    rows = _rows(text, p.suffix.lower(), f"--catalog {path}")
    items = []
    for n, row in enumerate(rows, start=1):
        title = (row.get("title") or "").strip()
        if not title:
            raise UsageError(f"--catalog {path}: row {n} has an empty 'title'")
        items.append(
            Item(
                id=str(row.get("id") or n),
                title=title,
                description=(row.get("description") or row.get("abstract") or "").strip(),
                category=(row.get("category") or "").strip(),
            )
        )
    if not items:
        raise UsageError(f"--catalog {path}: the catalog is empty")
    seen: set[str] = set()
    repeated = sorted({i.id for i in items if i.id in seen or seen.add(i.id)})  # type: ignore[func-returns-value]
    if repeated:  # profiles and eval sets name items by id: a repeated one would be ambiguous
        shown = ", ".join(repr(x) for x in repeated[:5]) + (" ..." if len(repeated) > 5 else "")
        raise UsageError(f"--catalog {path}: repeated item ids: {shown}")
    return items


def _rows(text: str, suffix: str, what: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    if suffix in (".jsonl", ".json") or lines[0].lstrip().startswith("{"):
        rows = []
        for n, line in enumerate(lines, start=1):
            try:
                row = jsondata.loads(line)
            except ValueError as exc:
                raise UsageError(f"{what}: line {n} is not valid JSON ({jsondata.reason(exc)})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{what}: line {n} is not a JSON object")
            rows.append(row)
        _need_title(rows[0].keys(), what)
        return rows
    delimiter = "\t" if suffix == ".tsv" or "\t" in lines[0] else ","
    first = next(csv.reader([lines[0]], delimiter=delimiter))
    if delimiter == "\t" and "title" not in first and len(first) == len(_MIND_NEWS) and re.fullmatch(r"N\d+", first[0]):
        return [dict(zip(_MIND_NEWS, r)) for r in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)]
    reader = csv.DictReader(io.StringIO(text.lstrip("\n"), newline=""), delimiter=delimiter, strict=True)
    rows, start = [], 1
    try:
        _need_title(reader.fieldnames or [], what)
        start = reader.line_num + 1
        for row in reader:
            where = f"{what}: line {start}" + (f"-{reader.line_num}" if reader.line_num != start else "")
            if None in row or None in row.values():
                raise UsageError(f"{where} has {_fields(row)} fields, the header {len(reader.fieldnames or [])}")
            if any("\n" in v or "\r" in v for v in row.values()):
                raise UsageError(f"{where}: a quoted field runs over several lines (an unclosed quote?)")
            rows.append(row)
            start = reader.line_num + 1
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise UsageError(f"{what}: the row from line {start} on is malformed {kind} ({exc}; an unclosed quote?)") from None
    return [r for r in rows if any(v.strip() for v in r.values())]


def _fields(row: dict[str | None, Any]) -> int:
    extra = row.get(None) or []
    return sum(v is not None for k, v in row.items() if k is not None) + len(extra)


def _need_title(columns: Any, what: str) -> None:
    if "title" not in columns:
        raise UsageError(f"{what}: no 'title' column (found: {', '.join(columns) or 'none'})")


def load_profile(path: str) -> Profile:
    try:
        data = jsondata.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--profile {path}: cannot read a JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--profile {path}: expected a JSON object with interests, liked, disliked")
    profile = Profile()
    for key in ("interests", "liked", "disliked"):
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"--profile {path}: '{key}' must be a list of strings")
        setattr(profile, key, value)
    return profile


# --- ranking -------------------------------------------------------------------------------


@dataclass
class Prompts:
    user: Template  # $interests
    neutral: str
    liked: Template  # $liked

    @classmethod
    def load(cls, user_path: str | None = None, neutral_path: str | None = None) -> Prompts:
        from aigc_cli.apps.prompts import load_prompt

        return cls(
            user=Template(load_prompt(user_path or "recommend-user.txt", "--template")),
            neutral=load_prompt(neutral_path or "recommend-neutral.txt", "--neutral-template"),
            liked=Template(load_prompt("recommend-liked.txt", "--template")),
        )


def contexts_for(profile: Profile, prompts: Prompts, catalog: Sequence[Item]) -> tuple[dict[str, str], dict[str, str]]:
    """(positive, negative) user prompts by label: one per interest, one for liked and one for disliked items."""
    titles = {i.id: i.title for i in catalog}
    positive = {f"interest:{i}": prompts.user.safe_substitute(interests=i) for i in profile.interests}
    if profile.liked:
        liked = "; ".join(titles.get(x, x) for x in profile.liked)
        positive["liked"] = prompts.liked.safe_substitute(liked=liked)
    negative = {}
    if profile.disliked:
        negative["disliked"] = prompts.liked.safe_substitute(liked="; ".join(titles.get(x, x) for x in profile.disliked))
    if not positive:
        raise UsageError("no user: give interests as arguments, or --profile FILE with interests or liked items")
    return positive, negative


def item_text(item: Item) -> str:
    return " " + item.title


def rank(
    engine: Any,
    catalog: Sequence[Item],
    profile: Profile,
    prompts: Prompts,
    kind: ScoreKind = ScoreKind.pmi,
    aggregate: Aggregate = Aggregate.max,
    batch_size: int = 16,
) -> list[Ranked]:
    """Every catalog item scored for the user, best first (ties keep catalog order)."""
    from aigc_cli.engine.scoring import continuation_logprobs

    positive, negative = contexts_for(profile, prompts, catalog)
    seen = set(profile.liked) | set(profile.disliked)
    items = [i for i in catalog if i.id not in seen and i.title not in seen]
    tok = engine.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    item_ids = [tok.encode(item_text(i), add_special_tokens=False) for i in items]
    contexts = {**positive, **negative}
    if kind is ScoreKind.pmi:
        contexts["neutral"] = prompts.neutral
    ctx_ids = {label: [bos, *tok.encode(text, add_special_tokens=False)] for label, text in contexts.items()}
    # Each distinct prompt is scored once per item (the neutral one too), so equal prompts give equal scores.
    unique = list(dict.fromkeys(tuple(ids) for ids in ctx_ids.values()))
    pairs = [(list(ctx), ids) for ctx in unique for ids in item_ids]
    lm = engine.lm
    sums = continuation_logprobs(lm.model, pairs, batch_size=batch_size, pad_id=bos, device=lm.device)
    by_ctx = {ctx: [sum(s) for s in sums[k * len(items) : (k + 1) * len(items)]] for k, ctx in enumerate(unique)}
    by_label = {label: by_ctx[tuple(ids)] for label, ids in ctx_ids.items()}
    ranked = []
    for j, item in enumerate(items):
        per = {}
        for label in [*positive, *negative]:
            value = by_label[label][j]
            if kind is ScoreKind.pmi:
                value -= by_label["neutral"][j]
            elif kind is ScoreKind.mean:
                value /= max(len(item_ids[j]), 1)
            per[label] = value
        pos = [per[label] for label in positive]
        score = max(pos) if aggregate is Aggregate.max else sum(pos) / len(pos)
        if negative:
            score -= sum(per[label] for label in negative) / len(negative)
        ranked.append(Ranked(item, score, per))
    ranked.sort(key=lambda r: -r.score)  # stable: ties keep catalog order
    return ranked


# --- evaluation ----------------------------------------------------------------------------


@dataclass
class EvalUser:
    profile: Profile
    candidates: list[str]  # item ids
    positives: set[str]


def load_eval(path: str) -> list[EvalUser]:
    """JSONL users (interests or liked, candidates, positives) or MIND's behaviors.tsv."""
    p = sample_path("eval.jsonl") if path == SAMPLE else Path(path)
    try:
        lines = [line for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--eval {path}: cannot read ({exc})") from None
    users = []
    for n, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                row = jsondata.loads(line)
                profile = Profile(interests=list(row.get("interests", [])), liked=list(row.get("liked", [])))
                users.append(EvalUser(profile, [str(c) for c in row["candidates"]], {str(c) for c in row["positives"]}))
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"--eval {path}: line {n} is not a user record ({exc})") from None
            continue
        cols = line.split("\t")  # MIND: impression id, user id, time, history, impressions
        if len(cols) != 5:
            raise UsageError(f"--eval {path}: line {n} is neither JSON nor MIND behaviors.tsv (5 tab-separated columns)")
        shown = [x.rsplit("-", 1) for x in cols[4].split()]
        users.append(
            EvalUser(Profile(liked=cols[3].split()), [i for i, _ in shown], {i for i, clicked in shown if clicked == "1"})
        )
    if not users:
        raise UsageError(f"--eval {path}: no users")
    return users


def metrics(ranking: Sequence[str], positives: set[str], k: int) -> dict[str, float]:
    """HR@k, nDCG@k, MRR and AUC of one ranked candidate list."""
    rel = [1 if i in positives else 0 for i in ranking]
    hits = sum(rel[:k])
    dcg = sum(r / math.log2(pos + 2) for pos, r in enumerate(rel[:k]))
    ideal = sum(1 / math.log2(pos + 2) for pos in range(min(k, sum(rel))))
    first = next((pos for pos, r in enumerate(rel) if r), None)
    n_pos, n_neg = sum(rel), len(rel) - sum(rel)
    # AUC: the share of (positive, negative) pairs ranked in the right order.
    correct, negatives_seen = 0, 0
    for r in reversed(rel):
        if r:
            correct += negatives_seen
        else:
            negatives_seen += 1
    return {
        f"HR@{k}": 1.0 if hits else 0.0,
        f"nDCG@{k}": dcg / ideal if ideal else 0.0,
        "MRR": 1.0 / (first + 1) if first is not None else 0.0,
        "AUC": correct / (n_pos * n_neg) if n_pos and n_neg else float("nan"),
    }


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    out = {}
    for key in keys:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def random_baseline(users: Sequence[EvalUser], k: int, shuffles: int = 200, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    rows = []
    for user in users:
        for _ in range(shuffles):
            order = list(user.candidates)
            rng.shuffle(order)
            rows.append(metrics(order, user.positives, k))
    return mean_metrics(rows)


def evaluate(
    engine: Any,
    catalog: Sequence[Item],
    users: Sequence[EvalUser],
    prompts: Prompts,
    k: int,
    kind: ScoreKind,
    aggregate: Aggregate,
    batch_size: int = 16,
) -> tuple[dict[str, float], dict[str, float]]:
    """(model metrics, random-ranking metrics), averaged over users."""
    by_id = {i.id: i for i in catalog}
    rows = []
    for n, user in enumerate(users, start=1):
        missing = [c for c in user.candidates if c not in by_id]
        if missing:
            raise UsageError(f"--eval: user {n} has candidates not in the catalog: {', '.join(missing[:3])}")
        candidates = [by_id[c] for c in user.candidates]
        ranked = rank(engine, candidates, user.profile, prompts, kind, aggregate, batch_size)
        rows.append(metrics([r.item.id for r in ranked], user.positives, k))
    return mean_metrics(rows), random_baseline(users, k)


def ideas(engine: Any, interests: list[str], per_interest: int, seed: int | None) -> list[dict[str, Any]]:
    """Short generated ideas per interest: one line each, deduplicated, none empty."""
    from aigc_cli.engine.engine import Request
    from aigc_cli.apps.prompts import load_prompt
    from aigc_cli.core.settings import GenerationSettings

    template = Template(load_prompt("recommend-ideas.txt", "--template"))
    settings = GenerationSettings(
        num_sequences=per_interest * 3, max_new_tokens=24, stop=("\n",), top_p=0.95, seed=seed
    ).resolved()
    base = run_seed(settings.seed)
    requests = [Request(i, template.safe_substitute(interests=x), settings, base) for i, x in enumerate(interests)]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, str]] = set()
    for c in engine.generate(requests):
        idea = c.text.strip().strip(".-*").strip()
        key = (c.id, idea.lower())
        if idea and key not in seen and sum(r["interest"] == interests[c.id] for r in rows) < per_interest:
            seen.add(key)
            rows.append({"interest": interests[c.id], "idea": idea, "generated": True})
    return rows
