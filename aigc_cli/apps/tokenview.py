"""Token views of `aigc score --tokens`: each text's tokens with their log-probabilities, ranks,
entropies and alternatives as records, GLTR's rank buckets (Gehrmann et al. 2019: top 10, 100,
1,000, beyond) and a per-text summary; no rendering."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# GLTR's buckets by rank, in order; a rank beyond the last limit is "beyond"
BUCKETS: tuple[tuple[str, int | None], ...] = (("top10", 10), ("top100", 100), ("top1000", 1000), ("beyond", None))
BUCKET_LABELS = {"top10": "top 10", "top100": "top 100", "top1000": "top 1,000", "beyond": "beyond"}


def bucket(rank: int | None) -> str | None:
    """The GLTR bucket of a rank (None for a token that was not scored)."""
    if rank is None:
        return None
    for name, limit in BUCKETS:
        if limit is None or rank <= limit:
            return name
    raise AssertionError("unreachable: the last bucket has no limit")


def text_record(view: Any, tok: Any) -> dict[str, Any]:
    """One text's record: perplexity, nll and token count as `aigc score` reports them, the count
    of scored tokens in each bucket, and the `tokens` list."""
    scored = view.scored
    nll = -view.total / len(scored) if scored else float("nan")
    counts = {name: 0 for name, _ in BUCKETS}
    names: dict[int, str] = {}

    def text_of(i: int) -> str:
        if i not in names:
            names[i] = str(tok.decode([i], clean_up_tokenization_spaces=False))
        return names[i]

    tokens = []
    for s in view.stats:
        b = bucket(s.rank)
        if b is not None:
            counts[b] += 1
        tokens.append(
            {
                "token": s.piece,
                "id": s.id,
                "logprob": s.logprob,
                "rank": s.rank,
                "entropy": s.entropy,
                "bucket": b,
                "top": [{"token": text_of(i), "id": i, "logprob": lp} for i, lp in s.top],
            }
        )
    return {
        "perplexity": math.exp(nll) if scored else float("nan"),
        "nll": nll,
        "token_count": len(scored),
        "buckets": counts,
        "tokens": tokens,
    }


def fractions(record: dict[str, Any]) -> dict[str, float]:
    """Each bucket's share of a text's scored tokens."""
    total = sum(record["buckets"].values())
    return {name: (count / total if total else 0.0) for name, count in record["buckets"].items()}


def token_records(
    engine: Any,
    pieces: list[tuple[int, str]],
    top: int,
    stride: int | None,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """A record for each (line number, text) with its `line`; a text that cannot be scored (no
    tokens, refused by the tokenizer) gets an error record and the rest go on."""
    from aigc_cli.engine.tokens import UnscorableError, token_view

    rows: list[dict[str, Any]] = []
    for n, piece in pieces:
        try:
            view = token_view(engine, piece, top, stride, batch_size, on_progress)
        except UnscorableError as exc:
            rows.append({"line": n, "error": {"code": exc.code, "message": str(exc)}})
            continue
        rows.append({"line": n, **text_record(view, engine.tokenizer)})
    return rows
