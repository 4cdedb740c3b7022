"""The engine: a model loaded once, prompts checked against its context, batched generation.

`Engine.generate(requests)` is the library entry point; the CLI is a thin layer over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aigc_cli.errors import RecordError
from aigc_cli.settings import Decoding, GenerationSettings

# `--batch-size auto`: at most this many rows per forward batch; on CPU fewer when their KV cache
# would pass AUTO_KV_BUDGET (long prompts or generations). Measured on 2 cores, GPT-2 small, 256
# prompts of 3-40 words, 32 sampled tokens: 16 rows 187-220 tok/s, 32 rows 256, 64 rows 261-281.
DEFAULT_CPU_BATCH = 64
DEFAULT_GPU_BATCH = 64
AUTO_KV_BUDGET = 1 << 30  # bytes


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
    extra: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list, repr=False)  # generated ids, EOS excluded
    logprobs: list[float] | None = field(default=None, repr=False)  # per token, when asked for


@dataclass
class _Row:
    request: Request
    index: int
    prompt_ids: list[int]


class Engine:
    """A loaded model and tokenizer, reused for every prompt of the process."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.name: str = lm.name
        self.context_length: int = lm.context_length

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> Engine:
        from aigc_cli.models import load

        return cls(load(model, device=device, dtype=dtype, quantize=quantize))

    def _auto_rows(self, rows: Sequence[_Row], settings: GenerationSettings) -> int:
        """How many of these rows (sorted by prompt length) an automatic CPU batch takes: the most
        whose KV cache, at its full length, stays within AUTO_KV_BUDGET (at least one)."""
        per_position = self._kv_bytes_per_position()
        if self.lm.device == "cuda" or per_position is None:
            return len(rows)

        if settings.decoding is Decoding.contrastive:  # each row branches into top_k rows every step
            per_position *= settings.top_k or 1

        def cache_bytes(n: int) -> int:  # the n-th row has the longest prompt of the first n
            return n * per_position * min(len(rows[n - 1].prompt_ids) + settings.max_new_tokens, self.context_length)

        n = len(rows)
        while n > 1 and cache_bytes(n) > AUTO_KV_BUDGET:
            n -= 1
        return n

    def _kv_bytes_per_position(self) -> int | None:
        """Bytes of keys and values one row holds per position (all layers); None if unknown."""
        import torch

        cfg = getattr(self.lm.model, "cfg", None) or getattr(self.lm.model, "config", None)
        layers = getattr(cfg, "n_layer", None) or getattr(cfg, "num_hidden_layers", None)
        width = getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", None)
        if not isinstance(layers, int) or not isinstance(width, int):
            return None
        return 2 * layers * width * getattr(torch, self.lm.dtype).itemsize

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]:
        """Token ids of a prompt; RecordError when it is empty or does not fit the context."""
        if prompt == "" or prompt.isspace():
            raise RecordError("empty_prompt", "the prompt is empty")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise RecordError("empty_prompt", "the prompt has no tokens")
        total = len(ids) + settings.max_new_tokens
        if total > self.context_length:
            raise RecordError(
                "prompt_too_long",
                f"the prompt has {len(ids)} tokens and --max-new-tokens is {settings.max_new_tokens}: "
                f"{total} is more than the model's context of {self.context_length} tokens",
            )
        return ids

    def generate(
        self,
        requests: Sequence[Request],
        batch_size: int | None = None,
        on_text: Callable[[Completion, str], None] | None = None,
        processors: Callable[[int], list[Any]] | None = None,
        logprobs: bool = False,
    ) -> Iterator[Completion]:
        """Generate every wanted sequence; yields completions in request order, index order.

        Rows of requests that share settings run together, sorted by prompt length so that
        similar lengths share a batch. `on_text(partial, text_so_far)` streams a lone row;
        `processors(prompt_width)` adds logits processors (poem forms) to every batch; `logprobs`
        records each token's log-probability under the unprocessed model (greedy and sampling).
        """
        from aigc_cli.decoding import generate_beam, generate_rows, row_seed

        auto = batch_size is None
        batch_size = batch_size or (DEFAULT_GPU_BATCH if self.lm.device == "cuda" else DEFAULT_CPU_BATCH)
        encoded = {
            id(r): list(r.prompt_ids) if r.prompt_ids is not None else self.encode(r.prompt, r.settings)
            for r in requests
        }
        done: dict[tuple[int, int], Completion] = {}

        def finish(row: _Row, text: str, reason: str, tokens: list[int], logp: list[float] | None = None) -> Completion:
            req = row.request
            return Completion(
                req.id, row.index, req.prompt, text, reason, len(row.prompt_ids), len(tokens), req.seed, token_ids=tokens, logprobs=logp
            )

        groups: dict[GenerationSettings, list[_Row]] = {}
        for req in requests:
            if req.settings.decoding is Decoding.beam:
                ids = encoded[id(req)]
                beams = generate_beam(self.lm, ids, req.settings, processors)
                for index in req.wanted():
                    res = beams[index]
                    done[(id(req), index)] = finish(_Row(req, index, ids), res.text, res.finish_reason, res.token_ids)
                continue
            rows = groups.setdefault(req.settings, [])
            rows.extend(_Row(req, index, encoded[id(req)]) for index in req.wanted())
        for settings, rows in groups.items():
            rows.sort(key=lambda r: len(r.prompt_ids))
            start = 0
            while start < len(rows):
                size = self._auto_rows(rows[start : start + batch_size], settings) if auto else batch_size
                chunk, start = rows[start : start + size], start + size
                stream = None
                if on_text is not None and len(rows) == 1:
                    lone = chunk[0]
                    partial = finish(lone, "", "", [])
                    stream = lambda _i, text, p=partial: on_text(p, text)  # noqa: E731
                seeds = [row_seed(r.request.seed, r.request.id, r.index) for r in chunk]
                results = generate_rows(self.lm, [r.prompt_ids for r in chunk], settings, seeds, stream, processors, logprobs)
                for r, res in zip(chunk, results):
                    done[(id(r.request), r.index)] = finish(r, res.text, res.finish_reason, res.token_ids, res.logprobs)
        for req in requests:
            for index in req.wanted():
                yield done[(id(req), index)]
