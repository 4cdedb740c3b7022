"""Log-probabilities under the model: batched continuation scoring and sliding-window perplexity.

`continuation_logprobs` is shared by `aigc score` and `aigc recommend`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    pad_id: int = 0,
    device: str = "cpu",
) -> list[list[float]]:
    """log P(token | everything before it) for each continuation token of each (context, continuation).

    Rows are right-padded (causal attention never looks right, so padding changes nothing) and
    sorted by length so each forward batch wastes little; results come back in input order.
    """
    out: list[list[float]] = [[] for _ in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [list(pairs[i][0]) + list(pairs[i][1]) for i in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for b, i in enumerate(chunk):
            ctx, cont = len(pairs[i][0]), len(pairs[i][1])
            if cont == 0:
                continue
            if ctx == 0:
                raise ValueError("a continuation needs at least one context token (e.g. BOS)")
            positions = torch.arange(ctx - 1, ctx - 1 + cont, device=logp.device)
            targets = ids[b, ctx : ctx + cont].to(logp.device)
            out[i] = logp[b, positions, targets].tolist()
    return out


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) windows over a sequence of n ids (ids[0] is BOS), as in the
    Hugging Face perplexity guide: each window holds at most `context` ids, and the ids from
    `first_target` to `end` are scored there, each exactly once, after the window's earlier ids."""
    windows = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # the window's first id has nothing before it to be scored on
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return windows


def perplexity(
    model: Any, ids: Sequence[int], bos_id: int, context: int, stride: int | None = None, batch_size: int = 8, device: str = "cpu"
) -> Perplexity:
    """Perplexity of a text's token ids, the first token conditioned on BOS; long texts use a sliding window."""
    seq = [bos_id, *ids]
    stride = stride or max(context // 2, 1)
    pairs = [(seq[b:first], seq[first:end]) for b, end, first in sliding_windows(len(seq), context, stride)]
    scores = continuation_logprobs(model, pairs, batch_size=batch_size, pad_id=bos_id, device=device)
    flat = [s for row in scores for s in row]
    return Perplexity(tokens=len(flat), nll=-sum(flat) / len(flat) if flat else float("nan"))
