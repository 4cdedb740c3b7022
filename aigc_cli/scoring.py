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
        spans = []  # (row, first predicting position, continuation length) per pair of the chunk
        for b, i in enumerate(chunk):
            ctx, cont = len(pairs[i][0]), len(pairs[i][1])
            if cont and ctx == 0:
                raise ValueError("a continuation needs at least one context token (e.g. BOS)")
            spans.append((b, ctx - 1, cont))
        for (b, first, cont), logp in zip(spans, _span_logprobs(model, ids.to(device), mask.to(device), spans)):
            if cont:
                targets = ids[b, first + 1 : first + 1 + cont].to(logp.device)
                out[chunk[b]] = logp.gather(-1, targets[:, None])[:, 0].tolist()
    return out


def _span_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Log-softmax rows at the positions that predict each continuation. aigc's native GPT-2 runs
    its LM head (50,257 x 768) on those positions only, not on every context and padding position
    as a whole-sequence call does: for a poem's rerank that is half the head's work, for recommend's
    long prompts and short items far more."""
    from aigc_cli.decoding import is_native

    if is_native(model):
        hidden = model.forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
        picked = torch.cat([hidden[b, first : first + cont] for b, first, cont in spans])
        flat = torch.log_softmax(model.logits(picked).float(), dim=-1)
        return list(flat.split([cont for _, _, cont in spans]))
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    return [logp[b, first : first + cont] for b, first, cont in spans]


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
