"""What the model sees at each token of a text: its log-probability, rank and the distribution's
entropy there, and the most likely alternatives, over the same sliding windows as `scoring`.

A token's rank is 1 + the number of vocabulary entries with a strictly higher log-probability at
its position: tokens tied with it share the best rank among them (competition ranking), so the
model's most likely token always has rank 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aigc_cli.core.textrules import TOKEN_CUTS
from aigc_cli.core.tokenizer import stretches
from aigc_cli.engine.scoring import _HEAD_ROWS, _PIECE, encode_long, sliding_windows, start_token
from aigc_cli.models.backends import Backend


class UnscorableError(ValueError):
    """A text that cannot be scored, with the error record's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TokenStat:
    id: int
    piece: str  # the decoded text this token adds (the pieces concatenate to the decoded text)
    logprob: float | None  # natural log of P(token | everything before it); None if not scored
    rank: int | None
    entropy: float | None  # of the model's distribution at this position, in nats
    top: list[tuple[int, float]]  # the most likely tokens there, with their log-probabilities


@dataclass
class TokenView:
    stats: list[TokenStat]

    @property
    def scored(self) -> list[TokenStat]:
        return [s for s in self.stats if s.logprob is not None]

    @property
    def total(self) -> float:
        """The sum of the scored tokens' log-probabilities: the text's log-likelihood."""
        return sum(s.logprob for s in self.stats if s.logprob is not None)


@torch.inference_mode()
def token_stats(
    model: Backend,
    ids: Sequence[int] | torch.Tensor,
    bos_id: int,
    context: int,
    top: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: Any = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, int, float, list[tuple[int, float]]] | None]:
    """(logprob, rank, entropy, top alternatives) for each of `ids`, the first conditioned on
    `bos_id`, scored in the windows `scoring.perplexity` uses (so the log-probabilities sum to its
    total); None for a token no window scores (the first of each later window when the stride
    equals the context). The LM head runs on _HEAD_ROWS positions at a time."""
    seq = torch.cat([torch.tensor([bos_id]), torch.as_tensor(ids, dtype=torch.long).reshape(-1)])
    stride = stride or max(context // 2, 1)
    windows = sliding_windows(len(seq), context, stride)
    out: list[tuple[float, int, float, list[tuple[int, float]]] | None] = [None] * (len(seq) - 1)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        batch = torch.full((len(chunk), width), bos_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, (begin, end, _) in enumerate(chunk):
            batch[b, : end - begin] = seq[begin:end]
            mask[b, : end - begin] = 1
        # right padding: causal attention never looks right, so the real tokens see only themselves
        hidden = model.forward(batch.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device), mask.to(device))
        picked = torch.cat([hidden[b, first - 1 - begin : end - 1 - begin] for b, (begin, end, first) in enumerate(chunk)])
        targets = torch.cat([seq[first:end] for _, end, first in chunk]).to(picked.device)
        where = [t - 1 for _, end, first in chunk for t in range(first, end)]  # index into `out` (ids, not seq)
        for lo in range(0, picked.shape[0], _HEAD_ROWS):
            logits = model.logits(picked[lo : lo + _HEAD_ROWS]).float()
            wanted = targets[lo : lo + _HEAD_ROWS, None]
            logp = logits.log_softmax(-1)
            chosen = logp.gather(-1, wanted)
            ranks = (logp > chosen).sum(-1) + 1
            entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # 0 * -inf (a masked token) counts 0
            if top:
                values, alternatives = logp.topk(min(top, logp.shape[-1]), dim=-1)
                tops = [list(zip(a, v)) for a, v in zip(alternatives.tolist(), values.tolist())]
            else:
                tops = [[] for _ in range(logp.shape[0])]
            rows = zip(chosen[:, 0].tolist(), ranks.tolist(), entropy.tolist(), tops)
            for i, row in zip(where[lo : lo + _HEAD_ROWS], rows):
                out[i] = row
        if on_progress is not None:
            on_progress(start + len(chunk), len(windows))
    return out


def pieces(tok: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, such that the pieces concatenate to the decoded text. A token
    that ends inside a character (byte-level BPE splits some characters over tokens) adds nothing
    and the token that completes the character carries it; each piece is decoded with a few tokens
    before it, so that tokenizers that join pieces (WordPiece's ##, spaces between words) decode as
    they would in the whole text."""
    out: list[str] = []
    done = 0  # tokens whose text is out
    for i in range(len(ids)):
        anchor = max(0, done - 4)
        before = _decode(tok, ids[anchor:done])
        now = _decode(tok, ids[anchor : i + 1])
        if now.endswith("\ufffd") and _completes_later(tok, ids, anchor, i):
            out.append("")  # the token that completes the character carries it
            continue
        out.append(now[len(before) :] if now.startswith(before) else _decode(tok, ids[done : i + 1]))
        done = i + 1
    return out


def encode_pieces(tok: Any, text: str) -> tuple[list[int], list[str]]:
    """Token ids of `text` (those of `scoring.encode_long`) and the text each token covers: with a
    tokenizer that reports character spans, the text from the end of the previous token's span to
    the end of its own (so the pieces concatenate to `text` exactly, an unknown character included);
    otherwise decoded (`pieces`)."""
    if not hasattr(tok, "encode_spans"):
        ids = encode_long(tok, text).tolist()
        return ids, pieces(tok, ids)
    ids, ends, start = [], [], 0
    while start < len(text):
        end = len(text)
        if end - start > _PIECE:
            match = TOKEN_CUTS.search(text, start + _PIECE)
            end = match.start() if match else len(text)
        part_ids, spans = tok.encode_spans(text[start:end])
        ids += part_ids
        ends += [start + e for _, e in spans]
        start = end
    return ids, stretches(text, ends)


def _completes_later(tok: Any, ids: Sequence[int], anchor: int, i: int) -> bool:
    """Whether a trailing replacement character at token i is a character cut in two (the next
    few tokens complete it) rather than bytes that are invalid for good."""
    for j in range(i + 1, min(i + 4, len(ids)) + 1):
        if not _decode(tok, ids[anchor:j]).endswith("\ufffd"):
            return True
    return False


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return str(tok.decode(list(ids), clean_up_tokenization_spaces=False)) if len(ids) else ""


def token_view(
    engine: Any,
    text: str,
    top: int,
    stride: int | None,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> TokenView:
    """`aigc score --tokens`: every token of a text with its piece, log-probability, rank, entropy
    and `top` alternatives under the engine's model, the first conditioned on the model's start
    token (as `scoring.score_texts`). UnscorableError when the text has no tokens or the tokenizer
    refuses it."""
    tok = engine.tokenizer
    try:
        ids, texts = encode_pieces(tok, text)
    except Exception as exc:  # noqa: BLE001 - the tokenizer's own failure, for this text alone
        raise UnscorableError("tokenizer_error", f"the tokenizer refused the text ({type(exc).__name__})") from exc
    if not ids:
        raise UnscorableError("empty_text", "there is no text to score")
    values = token_stats(
        engine.lm.model, ids, start_token(tok), engine.context_length, top, stride, batch_size, engine.lm.device, on_progress
    )
    stats = []
    for token_id, piece, value in zip(ids, texts, values):
        if value is None:
            stats.append(TokenStat(token_id, piece, None, None, None, []))
        else:
            logprob, rank, entropy, alternatives = value
            stats.append(TokenStat(token_id, piece, logprob, rank, entropy, alternatives))
    return TokenView(stats)
