"""What goes into the engine and what comes out of it: requests and completions, and the prompt
checks every engine shares (a local one, a server's client, a Ray driver); no torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.core.errors import RecordError, ref
from aigc_cli.core.settings import GenerationSettings, shown, text_problem


def prompt_ids(prompt: str, tokenize: Callable[[str], Sequence[int]]) -> list[int]:
    """A prompt's token ids (by the local tokenizer, a server's /tokenize, the driver's tokenizer);
    RecordError when the prompt is empty or has no tokens."""
    if prompt == "" or prompt.isspace():
        raise RecordError("empty_prompt", "the prompt is empty")
    ids = list(tokenize(prompt))
    if not ids:
        raise RecordError("empty_prompt", "the prompt has no tokens")
    return ids


def checked_prompt_ids(
    prompt: str,
    tokenize: Callable[[str], Sequence[int]],
    settings: GenerationSettings,
    context: int,
    prefix: Sequence[int] = (),
) -> list[int]:
    """A prompt's token ids once it passes the checks every engine makes, in the same order and
    with the same RecordErrors: valid text, not empty, some tokens, and room in the context for
    them and the settings' new tokens. `prefix` is what the model puts before every prompt ([CLS]
    for a BERT vocabulary; see models.conventions); `tokenize` may raise a RecordError of its own."""
    problem = text_problem(prompt)
    if problem is not None:
        raise RecordError("invalid_text", f"the prompt is {problem}")
    ids = [*prefix, *prompt_ids(prompt, tokenize)]
    check_length(len(ids), settings.max_new_tokens, context)
    return ids


def joins(prompt: str) -> bool:
    """Whether a completion's first token follows the prompt's last token as in one text (a
    WordPiece text puts a space between two Latin words): not when the prompt ends in whitespace,
    which a WordPiece tokenizer drops from the ids."""
    return not prompt[-1:].isspace()


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """RecordError when a prompt and its new tokens do not fit the model's context (shared with the
    CLI's server client, which checks before it sends)."""
    total = prompt_tokens + max_new_tokens
    if total > context:
        raise RecordError(
            "prompt_too_long",
            f"the prompt has {prompt_tokens} tokens and {ref('max_new_tokens')} is {shown(max_new_tokens)}: "
            f"{shown(total)} is more than the model's context of {context} tokens",
            field="max_new_tokens",
        )


@dataclass(frozen=True)
class Request:
    """One prompt and the sequences wanted for it."""

    id: Any  # prompt index, or the record id of a batch file
    prompt: str
    settings: GenerationSettings  # resolved
    seed: int
    indices: tuple[int, ...] | None = None  # sequence numbers to generate; None: all of 0..n-1
    prompt_ids: tuple[int, ...] | None = None  # from Engine.encode, when the caller checked the prompt already

    def wanted(self) -> tuple[int, ...]:
        return self.indices if self.indices is not None else tuple(range(self.settings.num_sequences))


@dataclass
class Completion:
    """One generated sequence of one request."""

    id: Any
    index: int  # 0-based sequence number
    prompt: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    record: dict[str, Any] | None = None  # its JSONL record, when the caller writes JSONL (batch.generated_record)
    token_ids: list[int] = field(default_factory=list, repr=False)  # generated ids, EOS excluded
    logprobs: list[float] | None = field(default=None, repr=False)  # per token, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)  # per token, when asked for
    end_token: int | None = field(default=None, repr=False)  # the end-of-text or stop token that ended it, if one did
    end_logprob: float | None = field(default=None, repr=False)
    end_top: list[tuple[int, float]] | None = field(default=None, repr=False)


class Cancelled(Exception):
    """The work was stopped before it finished (its client went away)."""


OnText = Callable[["Completion", str], None]
"""Called with a row's (partial) completion and each piece of its text as it is decoded."""
