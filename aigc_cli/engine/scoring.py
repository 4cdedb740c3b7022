"""Log-probabilities under the model: batched continuation scoring and sliding-window perplexity.

`continuation_logprobs` is shared by `aigc score` and `aigc recommend`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aigc_cli.core.textrules import TOKEN_CUTS

from aigc_cli.models.backends import Backend


@torch.inference_mode()
def continuation_logprobs(
    model: Backend,
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
        for (b, _, cont), logp in zip(spans, _span_logprobs(model, ids.to(device), mask.to(device), spans)):
            if cont:
                out[chunk[b]] = logp.tolist()
    return out


@torch.inference_mode()
def prompt_logprobs(model: Backend, ids: Sequence[int], top: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """For each token of a prompt, log P(token | the tokens before it) and the `top` most likely
    tokens there with theirs; None for the first token, which nothing predicts (as in OpenAI's
    `echo` with `logprobs`). The LM head runs on _HEAD_ROWS positions at a time."""
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None]
    if len(ids) < 2:
        return out
    tensor = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    hidden = model.forward(tensor, torch.arange(len(ids), device=model.device)[None], torch.ones_like(tensor))[0, :-1]
    targets = tensor[0, 1:]
    for start in range(0, hidden.shape[0], _HEAD_ROWS):
        logp = torch.log_softmax(model.logits(hidden[start : start + _HEAD_ROWS]).float(), dim=-1)
        chosen = logp.gather(-1, targets[start : start + _HEAD_ROWS, None])[:, 0].tolist()
        if top:
            values, alternatives = logp.topk(min(top, logp.shape[-1]), dim=-1)
            tops = [list(zip(a, v)) for a, v in zip(alternatives.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
        out.extend(zip(chosen, tops))
    return out


_HEAD_ROWS = 256  # positions per LM-head chunk: 256 x 50,257 float32 logits = 51 MB


def _span_logprobs(model: Backend, ids: torch.Tensor, mask: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """log P(target) at the positions that predict each continuation, in bounded memory: the LM
    head (50,257 x 768 for GPT-2) runs on those positions only, a chunk of positions at a time,
    not on every context and padding position as a whole-sequence call does: for a poem's rerank
    that is half the head's work, for recommend's long prompts and short items far more."""
    targets = [ids[b, first + 1 : first + 1 + cont] for b, first, cont in spans]
    hidden = model.forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
    picked = torch.cat([hidden[b, first : first + cont] for b, first, cont in spans])
    wanted = torch.cat(targets)
    parts = []
    for start in range(0, picked.shape[0], _HEAD_ROWS):
        logits = model.logits(picked[start : start + _HEAD_ROWS]).float()
        parts.append(logits.gather(-1, wanted[start : start + _HEAD_ROWS, None])[:, 0] - logits.logsumexp(-1))
    flat = torch.cat(parts) if parts else torch.empty(0)
    return list(flat.split([cont for _, _, cont in spans]))


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
    model: Backend,
    ids: Sequence[int] | torch.Tensor,
    bos_id: int,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of a text's token ids, the first token conditioned on BOS; long texts use a
    sliding window. Windows are scored `batch_size` at a time and only their sums are kept, so
    memory does not grow with the text; `on_progress(windows done, windows)` follows along."""
    seq = torch.cat([torch.tensor([bos_id]), torch.as_tensor(ids, dtype=torch.long)])
    stride = stride or max(context // 2, 1)
    windows = sliding_windows(len(seq), context, stride)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        pairs = [(seq[b:first].tolist(), seq[first:end].tolist()) for b, end, first in chunk]
        for row in continuation_logprobs(model, pairs, batch_size=batch_size, pad_id=bos_id, device=device):
            total += sum(row)
            count += len(row)
        if on_progress is not None:
            on_progress(start + len(chunk), len(windows))
    return Perplexity(tokens=count, nll=-total / count if count else float("nan"))


def score_texts(
    engine: Any,
    pieces: list[tuple[int, str]],
    stride: int | None,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """`aigc score`: a row of perplexity, nll and tokens for each (line number, text); a text that
    cannot be scored (no tokens, refused by the tokenizer) gets an error row in its place and the
    rest go on. Every text's first token is conditioned on the model's start token."""
    tok = engine.tokenizer
    bos = start_token(tok)
    rows: list[dict[str, Any]] = []
    for done, (n, piece) in enumerate(pieces):
        try:
            ids = encode_long(tok, piece)
        except Exception as exc:  # noqa: BLE001 - this text alone
            rows.append({"line": n, "error": {"code": "tokenizer_error", "message": f"the tokenizer refused the text ({type(exc).__name__})"}})
            continue
        if not len(ids):
            rows.append({"line": n, "error": {"code": "empty_text", "message": "there is no text to score"}})
            continue
        report = None if on_progress is None else (lambda d, total, base=done: on_progress(base + d, total))
        result = perplexity(engine.lm.model, ids, bos, engine.context_length, stride, batch_size, engine.lm.device, report)
        rows.append({"line": n, "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens})
    return rows


def start_token(tok: Any) -> int:
    """The token every scored text is conditioned on first: the tokenizer's BOS, else its EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


_PIECE = 1 << 16  # characters per tokenizer call


def encode_long(tok: Any, text: str) -> torch.Tensor:
    """Token ids of a long text, encoded a piece at a time (the tokenizer's working memory is
    many times the text's size). Pieces are cut only where the tokenizer splits anyway
    (`textrules.TOKEN_CUTS`), so the ids are those of one call."""
    parts, start = [], 0
    while start < len(text):
        end = len(text)
        if end - start > _PIECE:
            match = TOKEN_CUTS.search(text, start + _PIECE)
            end = match.start() if match else len(text)
        parts.append(torch.tensor(tok.encode(text[start:end], add_special_tokens=False), dtype=torch.long))
        start = end
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
