"""The language model as a zero-shot recommender: catalogs, user profiles, PMI ranking, metrics.

score(item) = log P(item | user prompt) - log P(item | neutral prompt), summed over the item's own
tokens (domain-conditional PMI, Holtzman et al. 2021). Item ids are encoded once, apart from any
prompt, so they are identical under every prompt.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import RecordError, UsageError
from aigc_cli.engine.seeds import run_seed
from aigc_cli.jobs.textfiles import Problems, read_lines, read_text

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


def load_catalog(path: str, problems: Problems | None = None) -> list[Item]:
    """Items from JSONL, CSV, TSV (with a header) or MIND's headerless news.tsv. A row that cannot
    be an item (malformed, no title, an id already used) is reported to `problems` (file, line,
    reason) and left out; UsageError when no item is left."""
    p = sample_path("catalog.jsonl") if path == SAMPLE else Path(path)
    problems = problems if problems is not None else Problems(f"--catalog {path}")
    items: list[Item] = []
    seen: set[str] = set()
    for line, row in _rows(str(p), p.suffix.lower(), f"--catalog {path}", problems):
        title = str(row.get("title") or "").strip()
        item_id = str(row.get("id") or line)
        if not title:
            problems.add(line, "no title (left out)")
        elif item_id in seen:  # profiles and eval sets name items by id: a repeated one would be ambiguous
            problems.add(line, f"item id {item_id!r} was used by an earlier row (left out)")
        else:
            seen.add(item_id)
            description = str(row.get("description") or row.get("abstract") or "").strip()
            items.append(Item(id=item_id, title=title, description=description, category=str(row.get("category") or "").strip()))
    if not items:
        raise UsageError(f"--catalog {path}: no items" + (f" ({len(problems)} rows left out)" if len(problems) else ""))
    return items


def _rows(path: str, suffix: str, what: str, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a catalog: JSONL objects, CSV/TSV rows under a header, or MIND's
    headerless news.tsv; a line that is not UTF-8 or not a row is reported and skipped."""
    lines: list[tuple[int, str]] = []
    for line in read_lines(path, what.split(" ")[0]):
        if line.text is None:
            problems.add(line.number, line.problem or "")
        elif line.text.strip():
            lines.append((line.number, line.text))
    if not lines:
        return
    first = lines[0][1]
    if suffix in (".jsonl", ".json") or first.lstrip().startswith("{"):
        yield from _json_rows(lines, what, problems)
        return
    delimiter = "\t" if suffix == ".tsv" or "\t" in first else ","
    header = next(csv.reader([first], delimiter=delimiter))
    if delimiter == "\t" and "title" not in header and len(header) == len(_MIND_NEWS) and re.fullmatch(r"N\d+", header[0]):
        for number, text in lines:
            cols = text.split("\t")
            if len(cols) == len(_MIND_NEWS):
                yield number, dict(zip(_MIND_NEWS, cols))
            else:
                problems.add(number, f"has {len(cols)} tab-separated fields, MIND's news.tsv has {len(_MIND_NEWS)}")
        return
    _need_title(header, what)
    for number, text in lines[1:]:
        try:
            (cells,) = list(csv.reader([text], delimiter=delimiter, strict=True))
        except (csv.Error, ValueError) as exc:  # an unclosed quote: no field may run over lines
            problems.add(number, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc}; an unclosed quote?)")
            continue
        if len(cells) != len(header):
            problems.add(number, f"has {len(cells)} fields, the header {len(header)}")
        elif any(c.strip() for c in cells):
            yield number, dict(zip(header, cells))


def _json_rows(lines: list[tuple[int, str]], what: str, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    titled = False
    for number, text in lines:
        try:
            row = jsondata.loads(text)
        except ValueError as exc:
            problems.add(number, f"not valid JSON ({jsondata.reason(exc)})")
            continue
        if not isinstance(row, dict):
            problems.add(number, "not a JSON object")
            continue
        titled = titled or "title" in row
        yield number, row
    if not titled:
        _need_title([], what)


def _need_title(columns: Any, what: str) -> None:
    if "title" not in columns:
        raise UsageError(f"{what}: no 'title' column (found: {', '.join(columns) or 'none'})")


def load_profile(path: str) -> Profile:
    try:
        data = jsondata.loads(read_text(path, "--profile"))
    except ValueError as exc:
        raise UsageError(f"--profile {path}: not a JSON object ({jsondata.reason(exc)})") from None
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
    line: int = 0  # where the user is in its file


def load_eval(path: str, problems: Problems | None = None) -> list[EvalUser]:
    """JSONL users (interests or liked, candidates, positives) or MIND's behaviors.tsv. A user that
    cannot be evaluated (a malformed line, no interests and no history, no candidate, no positive)
    is reported to `problems` (file, line, reason) and left out."""
    p = sample_path("eval.jsonl") if path == SAMPLE else Path(path)
    problems = problems if problems is not None else Problems(f"--eval {path}")
    users = []
    for line in read_lines(str(p), "--eval"):
        if line.text is None:
            problems.add(line.number, line.problem or "")
            continue
        if not line.text.strip():
            continue
        try:
            user = _eval_user(line.text)
        except ValueError as exc:
            problems.add(line.number, f"{exc} (left out)")
            continue
        user.line = line.number
        users.append(user)
    if not users:
        raise UsageError(f"--eval {path}: no user to evaluate" + (f" ({len(problems)} left out)" if len(problems) else ""))
    return users


def _eval_user(text: str) -> EvalUser:
    """One user of an eval file; ValueError saying why it cannot be evaluated."""
    if text.lstrip().startswith("{"):
        try:
            row = jsondata.loads(text)
            profile = Profile(interests=[str(x) for x in row.get("interests", [])], liked=[str(x) for x in row.get("liked", [])])
            user = EvalUser(profile, [str(c) for c in row["candidates"]], {str(c) for c in row["positives"]})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a user record ({jsondata.reason(exc) if isinstance(exc, ValueError) else exc!r})") from None
    else:
        cols = text.split("\t")  # MIND: impression id, user id, time, history, impressions
        if len(cols) != 5:
            raise ValueError("neither JSON nor MIND behaviors.tsv (5 tab-separated columns)")
        shown = [x.rsplit("-", 1) for x in cols[4].split()]
        if any(len(x) != 2 for x in shown):
            raise ValueError("impressions must be ITEM-0 or ITEM-1")
        user = EvalUser(Profile(liked=cols[3].split()), [i for i, _ in shown], {i for i, clicked in shown if clicked == "1"})
    if not user.profile.interests and not user.profile.liked:
        raise ValueError("the user has no interests and no history")
    if not user.candidates or not user.positives:
        raise ValueError("the user has no candidates" if not user.candidates else "the user has no positive candidate")
    return user


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
    problems: Problems | None = None,
) -> tuple[dict[str, float], dict[str, float], int]:
    """(model metrics, random-ranking metrics, users they cover), averaged over the users that can
    be ranked; a user whose candidates are not in the catalog is reported and left out."""
    by_id = {i.id: i for i in catalog}
    rows, kept = [], []
    for user in users:
        missing = [c for c in user.candidates if c not in by_id]
        if missing:
            if problems is not None:
                problems.add(user.line, f"candidates not in the catalog: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (left out)")
            continue
        ranked = rank(engine, [by_id[c] for c in user.candidates], user.profile, prompts, kind, aggregate, batch_size)
        rows.append(metrics([r.item.id for r in ranked], user.positives, k))
        kept.append(user)
    if not rows:
        raise UsageError("--eval: no user could be evaluated against this catalog")
    return mean_metrics(rows), random_baseline(kept, k), len(kept)


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
    requests = []
    for i, interest in enumerate(interests):
        request = Request(i, template.safe_substitute(interests=interest), settings, base)
        try:
            requests.append(engine.prepared(request))
        except RecordError as exc:  # named as recommend's own input: it has no --max-new-tokens
            room = "too long for the model's context" if exc.code == "prompt_too_long" else exc.message
            raise UsageError(f"interest {i + 1}: {room}") from None
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, str]] = set()
    for c in engine.generate(requests):
        idea = c.text.strip().strip(".-*").strip()
        key = (c.id, idea.lower())
        if idea and key not in seen and sum(r["interest"] == interests[c.id] for r in rows) < per_interest:
            seen.add(key)
            rows.append({"interest": interests[c.id], "idea": idea, "generated": True})
    return rows
