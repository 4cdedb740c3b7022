"""The engine: a model loaded once, prompts checked against its context, batched generation.

`Engine.generate(requests)` is the library entry point; the CLI is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aigc_cli.core.errors import RecordError, ref
from aigc_cli.core.settings import GenerationSettings
from aigc_cli.engine.requests import Completion, Request, check_length, prompt_ids

if TYPE_CHECKING:
    from aigc_cli.core.modelspec import ModelSpec
    from aigc_cli.engine.decoding import RowResult
    from aigc_cli.models.loading import LoadedModel
    from aigc_cli.core.tokenizer import Tokenizer

# `--batch-size auto`: at most this many rows per forward batch; on CPU fewer when their KV cache
# would pass AUTO_KV_BUDGET (long prompts or generations). Measured on 2 cores, GPT-2 small, 256
# prompts of 3-40 words, 32 sampled tokens: 16 rows 187-220 tok/s, 32 rows 256, 64 rows 261-281.
DEFAULT_CPU_BATCH = 64
DEFAULT_GPU_BATCH = 64
AUTO_KV_BUDGET = 1 << 30  # bytes
T = TypeVar("T")


@dataclass
class _Row:
    request: Request
    index: int
    prompt_ids: list[int]


class Engine:
    """A loaded model and tokenizer, reused for every prompt of the process."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.name: str = lm.name
        self.context_length: int = lm.context_length

    @classmethod
    def load(cls, spec: ModelSpec | str, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> Engine:
        """The engine of a model spec (or of a name, parsed with the other arguments)."""
        from aigc_cli.models.loading import load

        return cls(load(spec, device=device, dtype=dtype, quantize=quantize))

    def _auto_rows(self, rows: Sequence[_Row], settings: GenerationSettings) -> int:
        """How many of these rows (sorted by prompt length) an automatic CPU batch takes: the most
        whose KV cache, at its full length, stays within AUTO_KV_BUDGET (at least one)."""
        per_position = self.lm.model.kv_bytes_per_position()
        if self.lm.device == "cuda" or per_position is None:
            return len(rows)

        per_position *= settings.kv_rows()  # contrastive search branches each row into top_k rows

        def cache_bytes(n: int) -> int:  # the n-th row has the longest prompt of the first n
            return n * per_position * min(len(rows[n - 1].prompt_ids) + settings.max_new_tokens, self.context_length)

        n = len(rows)
        while n > 1 and cache_bytes(n) > AUTO_KV_BUDGET:
            n -= 1
        return n

    @property
    def revision(self) -> str:
        """Provenance: the weights' revision and precision (see models.LoadedModel.revision)."""
        return str(self.lm.revision)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lm.tokenizer

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token string (byte-level BPE writes one character
        per byte): no token of any text stands for more characters than this."""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]:
        """Token ids of a prompt; RecordError when it is empty or does not fit the context. A prompt
        with more characters than the context's tokens could ever hold is refused before it is
        tokenized (a 100 MB line took minutes and 17 GB to count)."""
        self.check_characters(prompt)
        ids = prompt_ids(prompt, lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        self.check_ids(ids, settings)
        return ids

    def check_characters(self, prompt: str) -> None:
        """RecordError when a prompt has more characters than the context could hold as tokens:
        checked before tokenizing, which costs time and memory in proportion to the text."""
        if len(prompt) > self.context_length * self.longest_token:
            raise RecordError(
                "prompt_too_long",
                f"the prompt has {len(prompt):,} characters: more than the model's context of {self.context_length} "
                f"tokens can hold (its longest token has {self.longest_token} characters)",
            )

    def check_ids(self, ids: Sequence[int], settings: GenerationSettings) -> None:
        """RecordError unless these prompt ids and settings can be generated from: not empty, in the
        vocabulary, within the context with the new tokens, within memory (beams, branches)."""
        if not ids:
            raise RecordError("empty_prompt", "the prompt has no tokens")
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RecordError("bad_token", f"token id {bad} is not in the model's vocabulary of {vocab}")
        bad = next((t for t in settings.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RecordError("bad_token", f"stop token id {bad} is not in the model's vocabulary of {vocab}")
        check_length(len(ids), settings.max_new_tokens, self.context_length)
        self._check_memory(settings, len(ids) + settings.max_new_tokens)

    def _check_memory(self, settings: GenerationSettings, positions: int) -> None:
        """Beam search keeps --num-beams rows (contrastive search --top-k branches), each with a KV
        cache of `positions`, twice while rows are reordered: refuse what memory cannot hold."""
        rows = settings.kv_rows()
        if rows == 1:
            return
        name = settings.mode.kv_rows or ""
        from aigc_cli.models.checkpoint import available_memory

        per_position, free = self.lm.model.kv_bytes_per_position(), available_memory()
        if per_position is None or free is None:
            return
        need = 2 * rows * positions * per_position
        if need > free:
            raise RecordError(
                "too_big",
                f"{ref(name)} {rows} with {positions} tokens needs {need / 2**30:.1f} GiB of KV cache, "
                f"more than the {free / 2**30:.1f} GiB of memory available",
                field=name,
            )

    def generate(
        self,
        requests: Iterable[Request],
        batch_size: int | None = None,
        on_text: Callable[[Completion, str], None] | None = None,
        processors: Callable[[int], list[Any]] | None = None,
        logprobs: bool = False,
        batching: str = "continuous",
    ) -> Iterator[Completion]:
        """Generate every wanted sequence; yields completions in request order, index order, each
        as soon as it and everything before it is done.

        `on_text(partial, text_so_far)` streams a lone row; `processors(prompt_width)` adds logits
        processors (poem forms) to every batch; `logprobs` records each token's log-probability
        under the unprocessed model (greedy and sampling).
        """
        for _, completions in self.stream(requests, lambda r: r, batch_size, on_text, processors, logprobs, batching):
            yield from completions

    def stream(
        self,
        items: Iterable[T],
        request_of: Callable[[T], Request | None],
        batch_size: int | None = None,
        on_text: Callable[[Completion, str], None] | None = None,
        processors: Callable[[int], list[Any]] | None = None,
        logprobs: bool = False,
        batching: str = "continuous",
    ) -> Iterator[tuple[T, list[Completion]]]:
        """Each item with its request's completions, in input order, as soon as they are done;
        items without a request (error records) pass through in their place.

        Greedy, sampled and contrastive rows of the native model run on the continuous-batching
        scheduler: the items are read ahead lazily (about two batches of rows), and a row starts as
        soon as a slot is free. Beam search runs one request at a time; poem forms (`processors`)
        and models without the native forward pass run in static batches of the requests read
        ahead (`_static`).

        `batching` (benchmarks): "continuous" (the default), "static" (the scheduler without refill:
        rows of any settings share a batch that runs until its longest row ends) or "grouped" (every
        request in static batches of identical settings, as aigc did before the scheduler).
        """
        if batching not in ("continuous", "static", "grouped"):
            raise ValueError(f"batching: {batching!r}")
        from aigc_cli.engine.seeds import row_seed
        from aigc_cli.engine.scheduler import Finished, RowSpec, Scheduler

        auto = batch_size is None
        cap = batch_size or (DEFAULT_GPU_BATCH if self.lm.device == "cuda" else DEFAULT_CPU_BATCH)
        scheduled = processors is None and self.lm.model.continuous and batching != "grouped"
        budget = AUTO_KV_BUDGET if auto and self.lm.device != "cuda" else None
        sched = Scheduler(self.lm, cap, budget, refill=batching == "continuous") if scheduled else None
        source = iter(items)
        ahead: deque[tuple[int, T, Request | None]] = deque()  # read, not yet yielded, in input order
        owners: dict[int, Request] = {}
        results: dict[tuple[int, int], Completion] = {}  # (read number, sequence index) -> completion
        count = 0

        def on_scheduler(req: Request | None) -> bool:
            return req is not None and sched is not None and req.settings.mode.runs_on == "scheduler"

        def read_one() -> bool:
            nonlocal count
            try:
                item = next(source)
            except StopIteration:
                return False
            req = request_of(item)
            if req is not None and req.prompt_ids is None:
                req = dataclasses.replace(req, prompt_ids=tuple(self.encode(req.prompt, req.settings)))
            n, count = count, count + 1
            ahead.append((n, item, req))
            if req is not None:
                owners[n] = req
            if on_scheduler(req):
                assert sched is not None and req is not None
                for index in req.wanted():
                    row = _Row(req, index, list(req.prompt_ids or ()))
                    stream = self._streamer(row, on_text) if on_text is not None else None
                    seed = row_seed(req.seed, req.id, index)
                    sched.submit(RowSpec((n, index), row.prompt_ids, req.settings, seed, stream, logprobs))
            return True

        def fill() -> bool:  # keep about two batches of rows ready behind the running ones
            while (sched is None or sched.pending < 2 * cap) and len(ahead) < 4 * cap:
                if not read_one():
                    if sched is not None:
                        sched.last_rows_submitted()
                    return False
            return True

        more = fill()
        while ahead or more:
            if not ahead:
                more = read_one()
                continue
            n, item, req = ahead[0]
            for index in req.wanted() if req is not None else ():
                while (n, index) not in results:
                    if on_scheduler(req):
                        assert sched is not None
                        for event in sched.step():
                            if isinstance(event, Finished):
                                key = cast(tuple[int, int], event.key)  # (read number, sequence index), as submitted
                                owner = owners[key[0]]
                                row = _Row(owner, key[1], list(owner.prompt_ids or ()))
                                results[key] = self._completion(row, event.result)
                        more = more and fill()
                    else:
                        pending = [(m, q) for m, _, q in ahead if q is not None and not on_scheduler(q)]
                        self._static(pending, n, results, cap, auto, on_text, processors, logprobs)
            ahead.popleft()
            owners.pop(n, None)
            yield item, [results.pop((n, i)) for i in (req.wanted() if req is not None else ())]
            more = more and fill()

    def _streamer(self, row: _Row, on_text: Callable[[Completion, str], None]) -> Callable[[str], None]:
        partial = self._completion(row, None)
        return lambda text: on_text(partial, text)

    @staticmethod
    def _completion(row: _Row, res: RowResult | None) -> Completion:
        req = row.request
        if res is None:
            return Completion(req.id, row.index, req.prompt, "", "", len(row.prompt_ids), 0, req.seed)
        return Completion(
            req.id, row.index, req.prompt, res.text, res.finish_reason, len(row.prompt_ids), len(res.token_ids), req.seed,
            token_ids=res.token_ids, logprobs=res.logprobs,
        )

    def _static(
        self,
        pending: list[tuple[int, Request]],
        head: int,
        results: dict[tuple[int, int], Completion],
        batch_size: int,
        auto: bool,
        on_text: Callable[[Completion, str], None] | None,
        processors: Callable[[int], list[Any]] | None,
        logprobs: bool,
    ) -> None:
        """Static batches: request `head` (beam search: alone), or every pending request with its
        settings, similar prompt lengths together; each batch runs until its longest row ends."""
        from aigc_cli.engine.decoding import generate_beam, generate_rows
        from aigc_cli.engine.seeds import row_seed

        first = dict(pending)[head]
        if first.settings.mode.runs_on == "beam":
            beams = generate_beam(self.lm, list(first.prompt_ids or ()), first.settings, processors)
            for index in first.wanted():
                results[(head, index)] = self._completion(_Row(first, index, list(first.prompt_ids or ())), beams[index])
            return
        rows = [
            (n, _Row(r, i, list(r.prompt_ids or ())))
            for n, r in pending
            if r.settings == first.settings
            for i in r.wanted()
            if (n, i) not in results
        ]
        rows.sort(key=lambda nr: len(nr[1].prompt_ids))
        start = 0
        while start < len(rows):
            size = self._auto_rows([r for _, r in rows[start : start + batch_size]], first.settings) if auto else batch_size
            chunk, start = rows[start : start + size], start + size
            stream = None
            if on_text is not None and len(rows) == 1:
                lone = self._streamer(chunk[0][1], on_text)
                stream = lambda _i, text: lone(text)  # noqa: E731
            seeds = [row_seed(r.request.seed, r.request.id, r.index) for _, r in chunk]
            out = generate_rows(self.lm, [r.prompt_ids for _, r in chunk], first.settings, seeds, stream, processors, logprobs)
            for (n, r), res in zip(chunk, out):
                results[(n, r.index)] = self._completion(r, res)

