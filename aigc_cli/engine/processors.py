"""Logits processors for the decode loop, computing exactly what transformers' classes of the same
names compute (tests compare them), without importing transformers at start-up."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RepetitionPenalty:
    """Divide positive (multiply negative) scores of tokens already in the sequence by `penalty`."""

    def __init__(self, penalty: float) -> None:
        if penalty <= 0:
            raise ValueError("penalty must be positive")
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        score = torch.gather(scores, 1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, input_ids, score)


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the row."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, length = self.n, input_ids.shape[-1]
        if length + 1 < n:
            return scores
        scores = scores.clone()
        for row, tokens in enumerate(input_ids.tolist()):
            prefix = tuple(tokens[length + 1 - n :]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(length - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


class MinNewTokens:
    """No EOS before `min_new` tokens were generated after the (padded) prompt."""

    def __init__(self, prompt_width: int, min_new: int, eos: int) -> None:
        self.prompt_width, self.min_new, self.eos = prompt_width, min_new, eos

    def holds(self, generated: int) -> bool:
        """Is EOS still held back after `generated` new tokens?"""
        return generated < self.min_new

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.holds(input_ids.shape[-1] - self.prompt_width):
            scores = scores.clone()
            scores[:, self.eos] = -float("inf")
        return scores


class NoBadWords:
    """Ban token sequences: the last token of a sequence whose other tokens end the row."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.single = sorted({s[0] for s in sequences if len(s) == 1})
        self.multi = [list(s) for s in sequences if len(s) > 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if self.single:
            scores[:, self.single] = -float("inf")
        if self.multi:
            for row, tokens in enumerate(input_ids.tolist()):
                for seq in self.multi:
                    if len(tokens) >= len(seq) - 1 and tokens[len(tokens) - len(seq) + 1 :] == seq[:-1]:
                        scores[row, seq[-1]] = -float("inf")
        return scores


class ProcessorList(list):
    """Apply processors in order."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores
