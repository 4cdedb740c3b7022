"""The engine: a model loaded once, prompts checked against its context, and the one place where a
request becomes rows (with their seeds) for the scheduler or static batches.

`Engine.generate(requests)` is the library entry point; `Engine.stream(items, request_of)` is what
the batch pipeline, the Ray workers and (through `engine.loop.EngineLoop`) the server run on. A
request that cannot be run (its prompt, its settings, a fault while decoding it) comes out as a
RecordError in its place; every other request is unaffected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aigc_cli.core.errors import RecordError, ref
from aigc_cli.core.settings import GenerationSettings, shown, text_problem
from aigc_cli.engine.requests import Completion, OnText, Request, check_length, joins, prompt_ids

if TYPE_CHECKING:
    from aigc_cli.core.modelspec import ModelSpec
    from aigc_cli.core.tokenizer import Tokenizer
    from aigc_cli.engine.decoding import RowResult
    from aigc_cli.engine.scheduler import RowSpec
    from aigc_cli.models.loading import LoadedModel

# `--batch-size auto`: at most this many rows per forward batch; on CPU fewer when their KV cache
# would pass AUTO_KV_BUDGET (long prompts or generations). Measured on 2 cores, GPT-2 small, 256
# prompts of 3-40 words, 32 sampled tokens: 16 rows 187-220 tok/s, 32 rows 256, 64 rows 261-281.
DEFAULT_CPU_BATCH = 64
DEFAULT_GPU_BATCH = 64
AUTO_KV_BUDGET = 1 << 30  # bytes
T = TypeVar("T")


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

    @property
    def revision(self) -> str:
        """Provenance: the weights' revision and precision (see models.LoadedModel.revision)."""
        return str(self.lm.revision)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lm.tokenizer

    @property
    def kv_budget(self) -> int:
        """Bytes of KV cache an automatic CPU batch may take (AUTO_KV_BUDGET, read when asked)."""
        return AUTO_KV_BUDGET

    @property
    def default_batch(self) -> int:
        return DEFAULT_GPU_BATCH if self.lm.device == "cuda" else DEFAULT_CPU_BATCH

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token string (byte-level BPE writes one character
        per byte): no token of any text stands for more characters than this. Our own tokenizer
        knows it already (core.tokenizer.FastTokenizer.longest_token); a transformers one is asked."""
        known = getattr(self.tokenizer, "longest_token", None)
        return known if isinstance(known, int) else max(map(len, self.tokenizer.get_vocab()), default=1)

    # -- checking prompts -----------------------------------------------------------------------

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]:
        """Token ids of a prompt; RecordError when it is not valid text, empty, refused by the
        tokenizer or does not fit the context. A prompt with more characters than the context's
        tokens could ever hold is refused before it is tokenized (a 100 MB line took minutes)."""
        problem = text_problem(prompt)
        if problem is not None:
            raise RecordError("invalid_text", f"the prompt is {problem}")
        self.check_characters(prompt)
        ids = self.prefix + prompt_ids(prompt, self._tokenize)
        self.check_ids(ids, settings)
        return ids

    @property
    def prefix(self) -> list[int]:
        """What every prompt starts with: [CLS] for a BERT-vocabulary model (as it was trained),
        nothing for GPT-2 (see models.conventions)."""
        conventions = self.lm.conventions
        return list(conventions.prefix) if conventions is not None else []

    def _tokenize(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - the tokenizer's own refusal, whatever its type
            raise RecordError("tokenizer_error", f"the tokenizer refused the prompt ({type(exc).__name__}: {_first_line(exc)})") from None

    def check_characters(self, prompt: str) -> None:
        """RecordError when a prompt has more characters than the context could hold as tokens:
        checked before tokenizing, which costs time and memory in proportion to the text."""
        if len(prompt) > self.context_length * self.longest_token:
            raise RecordError(
                "prompt_too_long",
                f"the prompt has {len(prompt):,} characters: more than the model's context of {self.context_length} "
                f"tokens can hold (its longest token has {self.longest_token} characters)",
            )

    def check_ids(self, ids: Sequence[int], settings: GenerationSettings, new_tokens: int | None = None) -> None:
        """RecordError unless these prompt ids and settings can be generated from: not empty, in the
        vocabulary, within the context with the new tokens (`new_tokens`, default the settings'
        max_new_tokens; 0 when only the prompt is scored), within memory (beams, branches)."""
        if not ids:
            raise RecordError("empty_prompt", "the prompt has no tokens")
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RecordError("bad_token", f"token id {shown(bad)} is not in the model's vocabulary of {vocab}", field="prompt")
        bad = next((t for t in settings.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RecordError(
                "bad_token", f"{ref('stop_token_ids')}: token id {shown(bad)} is not in the model's vocabulary of {vocab}", field="stop_token_ids"
            )
        wanted = settings.max_new_tokens if new_tokens is None else new_tokens
        check_length(len(ids), wanted, self.context_length)
        self._check_memory(settings, len(ids) + wanted)

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

    def prepared(self, request: Request) -> Request:
        """The request with its prompt's token ids (checked); RecordError otherwise."""
        if request.prompt_ids is not None:
            return request
        import dataclasses

        return dataclasses.replace(request, prompt_ids=tuple(self.encode(request.prompt, request.settings)))

    # -- rows -------------------------------------------------------------------------------------

    def on_scheduler(self, request: Request) -> bool:
        """Whether a request's rows run on the continuous-batching scheduler (greedy, sampled and
        contrastive rows of the native model) rather than in static batches (beam search, models
        behind the transformers adapter)."""
        return request.settings.mode.runs_on == "scheduler" and bool(self.lm.model.continuous)

    def row_specs(
        self, request: Request, key: Callable[[int], Hashable], logprobs: bool = False, top: int = 0, on_text: OnText | None = None
    ) -> list[RowSpec]:
        """The scheduler rows of a prepared request, one per wanted sequence, each with its own seed
        (`seeds.row_seed`): the only place a request becomes rows."""
        from aigc_cli.engine.scheduler import RowSpec
        from aigc_cli.engine.seeds import row_seed

        ids = list(request.prompt_ids or ())
        specs = []
        for index in request.wanted():
            stream = self.streamer(request, index, on_text) if on_text is not None else None
            seed = row_seed(request.seed, request.id, index)
            specs.append(RowSpec(key(index), ids, request.settings, seed, stream, logprobs, top, joins(request.prompt)))
        return specs

    def streamer(self, request: Request, index: int, on_text: OnText) -> Callable[[str], None]:
        """A row's text callback: `on_text` with the row's (empty) partial completion."""
        partial = self.completion(request, index, None)
        return lambda text: on_text(partial, text)

    @staticmethod
    def completion(request: Request, index: int, result: RowResult | None) -> Completion:
        """The completion of one row (an empty partial one while it streams)."""
        prompt_tokens = len(request.prompt_ids or ())
        if result is None:
            return Completion(request.id, index, request.prompt, "", "", prompt_tokens, 0, request.seed)
        return Completion(
            request.id, index, request.prompt, result.text, result.finish_reason, prompt_tokens, len(result.token_ids), request.seed,
            token_ids=result.token_ids, logprobs=result.logprobs, top_logprobs=result.top_logprobs,
            end_token=result.end_token, end_logprob=result.end_logprob, end_top=result.end_top,
        )

    # -- running -----------------------------------------------------------------------------------

    def generate(
        self,
        requests: Iterable[Request],
        batch_size: int | None = None,
        on_text: OnText | None = None,
        processors: Callable[[int], list[Any]] | None = None,
        logprobs: bool = False,
        batching: str = "continuous",
    ) -> Iterator[Completion]:
        """Generate every wanted sequence; yields completions in request order, index order, each
        as soon as it and everything before it is done; raises the RecordError of a request that
        cannot be run when its turn comes.

        `on_text(partial, text_so_far)` streams a lone row; `processors(prompt_width)` adds logits
        processors (poem forms) to every batch; `logprobs` records each token's log-probability
        under the unprocessed model (greedy and sampling).
        """
        for _, completions in self.stream(requests, lambda r: r, batch_size, on_text, processors, logprobs, batching):
            if isinstance(completions, RecordError):
                raise completions
            yield from completions

    def stream(
        self,
        items: Iterable[T],
        request_of: Callable[[T], Request | None],
        batch_size: int | None = None,
        on_text: OnText | None = None,
        processors: Callable[[int], list[Any]] | None = None,
        logprobs: bool = False,
        batching: str = "continuous",
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[T, list[Completion] | RecordError]]:
        """Each item with its request's completions, or the RecordError that stopped its request,
        in input order, as soon as they are done; items without a request (error records) pass
        through in their place. See `engine.stream.OrderedRun` for how the work is scheduled.

        `batching` (benchmarks): "continuous" (the default), "static" (the scheduler without refill:
        rows of any settings share a batch that runs until its longest row ends) or "grouped" (every
        request in static batches of identical settings, as aigc did before the scheduler). `stop()`
        is asked at every decoding step of static batches and beam search: when true, they raise
        `Cancelled`.
        """
        from aigc_cli.engine.stream import OrderedRun

        run = OrderedRun(self, iter(items), request_of, batch_size, on_text, processors, logprobs, batching, stop)
        yield from run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
