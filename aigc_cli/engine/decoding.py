"""Decoding loops over a loaded causal LM: greedy, sampling, contrastive search and beam search.

Greedy, sampling and contrastive search run in one lean loop with a KV cache, so that each row
has its own random generator (a prompt's output does not depend on its batch mates), rows that
finish leave the batch, and stop strings / banned words are checked on the decoded text. Beam
search is a port of transformers' vectorised beam search onto the same cache; models without the
native forward pass use transformers' `generate` for it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from aigc_cli.models.backends import Backend

if TYPE_CHECKING:
    from aigc_cli.core.tokenizer import Tokenizer
from aigc_cli.engine.processors import MinNewTokens, NoBadWords, NoRepeatNGram, ProcessorList, RepetitionPenalty
from aigc_cli.core.settings import Decoding, GenerationSettings
from aigc_cli.core.textrules import BanRule, find_stop
from aigc_cli.engine.requests import Cancelled

_BAN_RETRIES = 64
OnText = Callable[[int, str], None]
# Builds extra logits processors (e.g. a poem form) for a batch whose prompts are left-padded to this width.
ExtraProcessors = Callable[[int], list[Any]]


@dataclass
class RowResult:
    """One generated sequence."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "stop" | "eos"
    logprobs: list[float] | None = None  # log P(token) under the model before any processor, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the most likely tokens and their log P
    end_token: int | None = None  # the end-of-text or stop token that ended it (generated, not part of the text)
    end_logprob: float | None = None  # its log P, when logprobs were asked for
    end_top: list[tuple[int, float]] | None = None  # the most likely tokens where it was chosen


_KEEP = 4  # tokens at the end of a row's text that stay undecided (a character may span them)


@dataclass
class _Row:
    """Per-row bookkeeping shared by the loops: generated ids, decoded text and the finish test.

    The text is decoded incrementally: the ids before `_cut` were decoded once into `_head` and
    are never decoded again, so a step costs the same at token 1,000 as at token 10 (decoding the
    whole row every step made long generations quadratic). The cut only moves to where decoding
    the two sides apart gives the same text as decoding them together (never inside a character
    that spans tokens). Stop strings are looked for in the new text only."""

    tokenizer: Tokenizer
    prompt_tail: str
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    end_token: int | None = None
    end_logprob: float | None = None
    _head: str = ""
    _cut: int = 0
    before: int | None = None  # the prompt's last token: a WordPiece text's first space depends on it

    def _decode(self, ids: list[int], at: int = 0) -> str:
        """The text of `ids`, which start at generated[at]. A WordPiece token alone does not carry
        the space before it (between two Latin words), so there the token before them decides it;
        byte-level BPE tokens carry their own spaces."""
        if getattr(self.tokenizer, "wordpiece", False):
            before = self.generated[at - 1] if at > 0 else self.before
            return "".join(self.tokenizer.pieces(ids, before))  # type: ignore[attr-defined]
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def text_with(self, token: int) -> str:
        return self._head + self._decode(self.generated[self._cut :] + [token], self._cut)

    def _tail(self) -> str:
        """The text after `_head`, settling all but the last few tokens into the head when that
        does not change the text."""
        ids = self.generated
        tail = self._decode(ids[self._cut :], self._cut)
        if len(ids) - self._cut >= 2 * _KEEP:
            k = len(ids) - _KEEP
            left, right = self._decode(ids[self._cut : k], self._cut), self._decode(ids[k:], k)
            if left + right == tail:
                self._head, self._cut, tail = self._head + left, k, right
        return tail

    def push(self, token: int, step: int, eos: int | None, s: GenerationSettings, logprob: float | None = None) -> bool:
        """Append one token (step counts from 0); returns whether the text grew."""
        if token == eos or token in s.stop_token_ids:
            self.finish_reason = "eos" if token == eos else "stop"
            self.end_token, self.end_logprob = token, logprob
            return False
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        settled = len(self._head)  # text that cannot change any more
        tail = self._tail()  # (may move text into the head)
        text = self._head + tail
        if s.stop:
            start = max(0, settled - max(len(x) for x in s.stop) + 1)
            cut = find_stop(text[start:], s.stop)
            if cut is not None:
                text = text[: start + cut]
                self.finish_reason = "stop"
        if self.finish_reason is None and step + 1 >= s.max_new_tokens:
            self.finish_reason = "length"
        self.text = text
        return True

    def result(self, logprobs: bool, top: list[list[tuple[int, float]]] | None = None, end_top: list[tuple[int, float]] | None = None) -> RowResult:
        return RowResult(
            self.generated, self.text, self.finish_reason or "length", self.logprobs if logprobs else None, top,
            self.end_token, self.end_logprob if logprobs else None, end_top,
        )


class RowRules:
    """What one set of settings asks of every row decoded with it: logits processors in
    transformers' order (repetition penalty, no-repeat-ngram, bad words, min new tokens) and the
    banned-word check on decoded text."""

    def __init__(self, tokenizer: Tokenizer, settings: GenerationSettings) -> None:
        self.tok, self.s = tokenizer, settings
        self.eos = tokenizer.eos_token_id
        self.ban = BanRule(settings.ban)
        # The usual tokenizations of banned words are masked up front; the text check catches the rest.
        seqs = {tuple(tokenizer.encode(v, add_special_tokens=False)) for v in self.ban.variants()}
        self.ban_sequences = [list(q) for q in seqs if q]

    def processors(self, prompt_width: int) -> ProcessorList:
        s, procs = self.s, ProcessorList()
        if s.repetition_penalty != 1.0:
            procs.append(RepetitionPenalty(s.repetition_penalty))
        if s.no_repeat_ngram_size > 0:
            procs.append(NoRepeatNGram(s.no_repeat_ngram_size))
        if self.ban_sequences:
            procs.append(NoBadWords(self.ban_sequences))
        if s.min_new_tokens > 0 and self.eos is not None:  # without an EOS token there is nothing to hold back
            procs.append(MinNewTokens(prompt_width, s.min_new_tokens, self.eos))
        return procs

    def violates_ban(self, row: _Row, token: int) -> bool:
        if not self.ban or token == self.eos:
            return False
        return self.ban.violated(row.prompt_tail + row.text, row.prompt_tail + row.text_with(token))


class _Decoder:
    """Shared state of one batch decode: rows, rules, processors."""

    def __init__(
        self,
        lm: Any,
        prompts: Sequence[list[int]],
        settings: GenerationSettings,
        on_text: OnText | None,
        extra: ExtraProcessors | None = None,
        logprobs: bool = False,
        joins: Sequence[bool] | None = None,
    ):
        self.model = lm.model
        self.logprobs = logprobs
        self.tok = lm.tokenizer
        self.device = lm.device
        self.s = settings
        self.on_text = on_text
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.rules = RowRules(self.tok, settings)
        self.ban = self.rules.ban
        width = max(len(p) for p in prompts)
        self.prompt_width = width
        self.rows = [
            _Row(self.tok, self.tok.decode(p[-16:], clean_up_tokenization_spaces=False), before=p[-1] if p and (joins is None or joins[i]) else None)
            for i, p in enumerate(prompts)
        ]
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: GPT-2 continues from the right edge
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        self.ids = ids.to(self.device)
        self.mask = mask.to(self.device)
        self.processors = self._processors()
        self.extra = extra(width) if extra is not None else []
        self.processors.extend(self.extra)  # after the penalties, so a form can guard rows they emptied
        self.stop: Callable[[], bool] | None = None

    def check_stop(self) -> None:
        if self.stop is not None and self.stop():
            raise Cancelled("stopped")

    def _processors(self) -> ProcessorList:
        return self.rules.processors(self.prompt_width)

    def ban_token_sequences(self) -> list[list[int]]:
        return self.rules.ban_sequences

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def violates_ban(self, row: _Row, token: int) -> bool:
        return self.rules.violates_ban(row, token)

    def accept(self, row_index: int, token: int, step: int, logprob: float | None = None) -> None:
        """Append `token` to a row, decide whether the row is finished, and report its text."""
        row = self.rows[row_index]
        if row.push(token, step, self.eos, self.s, logprob) and self.on_text is not None:
            self.on_text(row_index, row.text)

    def results(self) -> list[RowResult]:
        return [r.result(self.logprobs) for r in self.rows]



class _Runner:
    """One static batch's forward passes on a model backend and its KV cache."""

    def __init__(self, model: Backend, batch: int, capacity: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch, capacity)

    @overload
    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, hidden: Literal[False] = ...
    ) -> tuple[torch.Tensor, None]: ...

    @overload
    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, hidden: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of the last position (B, V) in float32, last-layer hidden states (B, T, E) or None)."""
        h = self.model.forward(ids, positions, mask, self.cache)
        return self.model.logits(h[:, -1, :]).float(), (h.float() if hidden else None)

    def select(self, index: torch.Tensor) -> None:
        self.cache.select(index)

    def repeat_interleave(self, times: int) -> None:
        self.cache.repeat_interleave(times)


@torch.inference_mode()
def generate_rows(
    lm: Any,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    seeds: Sequence[int],
    on_text: OnText | None = None,
    extra: ExtraProcessors | None = None,
    logprobs: bool = False,
    stop: Callable[[], bool] | None = None,
    joins: Sequence[bool] | None = None,
) -> list[RowResult]:
    """Generate one sequence per prompt row (rows may repeat a prompt); `settings` must be resolved.
    `logprobs`: record each generated token's log-probability under the unprocessed model
    (greedy and sampling; contrastive search leaves them None). `stop()` is asked every step:
    when true, Cancelled is raised."""
    if settings.decoding is Decoding.beam:
        raise ValueError("beam search generates several rows per prompt: use generate_beam")
    dec = _Decoder(lm, prompts, settings, on_text, extra, logprobs and settings.decoding is not Decoding.contrastive, joins)
    dec.stop = stop
    if settings.decoding is Decoding.contrastive:
        _contrastive_loop(dec)
    else:
        _sample_loop(dec, seeds)
    return dec.results()


def greedy_tokens(scores: torch.Tensor) -> list[int]:
    """Each row's argmax, as torch's: the first of equal maxima, a NaN over any number. On the CPU
    through numpy, whose argmax is vectorised: 4 us for GPT-2's 50,257 scores against torch's
    44 (2-core AMD EPYC, one thread; ~0.5% of an int8 token)."""
    if scores.is_cpu and scores.dtype in (torch.float32, torch.float64, torch.float16):
        try:  # no detach() first: ~12 us, run cold after a forward pass
            return scores.numpy().argmax(-1).tolist()  # type: ignore[no-any-return]
        except RuntimeError:  # scores that require grad
            return scores.detach().numpy().argmax(-1).tolist()  # type: ignore[no-any-return]
    return scores.argmax(-1).tolist()  # type: ignore[no-any-return]


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1, _MIX2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; shifts made logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(seeds: torch.Tensor, draws: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64, shaped like `tokens`), a pure function of each row's seed,
    its draw number and the token id: counter-based, so no generator state to keep per row."""
    key = _mix(_mix(seeds * _GOLDEN + draws)[:, None] + tokens * _GOLDEN)
    u = (((key >> 11) & ((1 << 53) - 1)).double() + 0.5) / float(1 << 53)  # in (0, 1)
    return -torch.log(-torch.log(u))


_BLOCK = 256  # candidates per block of the two-stage race


def _race(vals: torch.Tensor, tokens: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max winner's position (B, 1) among the candidates `vals` (-inf: excluded), each
    candidate's noise keyed by its token id. Over many candidates (plain sampling from 50,257
    tokens) the race runs in two stages, which samples from exactly the same distribution with
    noise for ~450 values instead of every token: a race between blocks of _BLOCK consecutive
    candidates on their log-masses (noise keyed by the block), then a race inside the winning block."""
    rows, width = vals.shape
    if width <= 4 * _BLOCK:
        return (vals.double() + gumbel_noise(seeds, draws, tokens)).argmax(-1, keepdim=True)
    full = width // _BLOCK
    masses = [_log_mass(vals[:, : full * _BLOCK].view(rows, full, _BLOCK))]
    if width > full * _BLOCK:
        masses.append(_log_mass(vals[:, None, full * _BLOCK :]))
    mass = torch.cat(masses, dim=1)
    block_ids = -1 - torch.arange(mass.shape[1], device=vals.device).expand(rows, -1)  # keys apart from token ids
    b = (mass + gumbel_noise(seeds, draws, block_ids)).argmax(-1)  # every row has a finite candidate
    where = b[:, None] * _BLOCK + torch.arange(_BLOCK, device=vals.device)
    inside = where < width
    where = where.clamp(max=width - 1)
    race = (vals.gather(1, where).double() + gumbel_noise(seeds, draws, tokens.gather(1, where))).masked_fill(~inside, -float("inf"))
    return where.gather(1, race.argmax(-1, keepdim=True))


def _log_mass(blocks: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the last dimension, summed in float64 (agrees with a float64 logsumexp to ~1e-8)."""
    top = blocks.amax(-1, keepdim=True)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(blocks - safe).sum(-1, dtype=torch.float64)
    return safe.squeeze(-1).double() + total.log()


_SHORTLIST = 1024  # top-p/typical/min-p without top-k look at the best 1024 tokens when they hold the nucleus


class _Sampler:
    """Draws one token per row, with the warpers of transformers in their order (temperature, top-k,
    top-p, min-p, typical) applied to a sorted shortlist instead of the whole vocabulary.

    The draw is a Gumbel-max race: each kept token's score gets noise that is a pure function of
    (row seed, draw number, token id), and the best total wins. That samples exactly from the
    filtered distribution, and unlike an inverse-CDF draw over a cumulative sum, the winner changes
    only when two totals fall within the ~1e-6 by which a batch's shape moves the logits: a row's
    text does not depend on its batch mates, the batch size or the arrival order."""

    def __init__(self, s: GenerationSettings) -> None:
        self.s = s

    @staticmethod
    def key(s: GenerationSettings) -> tuple[object, ...]:
        """What a draw depends on: rows whose settings differ only elsewhere (lengths, stop strings,
        penalties applied before the draw) are drawn together."""
        return (s.decoding, s.temperature, s.top_k, s.top_p, s.min_p, s.typical_p)

    def __call__(self, scores: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """`seeds` (B,) int64 row seeds, `draws` (B,) the row's draw number (its step)."""
        s = self.s
        if s.temperature != 1.0:
            scores = scores / s.temperature
        vocab = scores.shape[-1]
        filtered = s.top_p < 1.0 or s.typical_p < 1.0 or bool(s.min_p)
        if s.top_k and s.top_k < vocab:
            vals, idx = scores.topk(s.top_k, dim=-1)
        elif filtered and vocab > _SHORTLIST:
            vals, idx = scores.topk(_SHORTLIST, dim=-1)
            if not self._holds_nucleus(vals, scores):
                vals, idx = scores.sort(dim=-1, descending=True)
        elif filtered:
            vals, idx = scores.sort(dim=-1, descending=True)
        else:
            vals, idx = scores, None  # plain sampling from the whole distribution
        tokens = idx if idx is not None else torch.arange(vocab, device=scores.device).expand_as(vals)
        if idx is None:  # nothing filtered: processors' -inf already keeps tokens out of the race
            return _race(vals, tokens, seeds.to(scores.device), draws.to(scores.device)).squeeze(1)
        keep = torch.isfinite(vals)
        if s.top_p < 1.0:
            probs = torch.softmax(vals, dim=-1)
            before = probs.cumsum(-1) - probs  # mass of the better tokens
            keep &= before < s.top_p
        if s.min_p:
            probs = torch.softmax(vals.masked_fill(~keep, -float("inf")), dim=-1)
            keep &= probs >= s.min_p * probs[:, :1]
        if s.typical_p < 1.0:
            keep &= self._typical(vals.masked_fill(~keep, -float("inf")))
        keep[:, 0] |= ~keep.any(-1)  # never an empty row
        kept = vals.masked_fill(~keep, -float("inf"))
        seeds, draws = seeds.to(scores.device), draws.to(scores.device)
        if kept.shape[-1] > 4 * _BLOCK:  # race in token order, so that blocks never depend on how near-ties sort
            dense = torch.full_like(scores, -float("inf")).scatter(1, idx, kept)
            return _race(dense, torch.arange(vocab, device=scores.device).expand_as(dense), seeds, draws).squeeze(1)
        return idx.gather(1, _race(kept, tokens, seeds, draws)).squeeze(1)

    def _holds_nucleus(self, vals: torch.Tensor, scores: torch.Tensor) -> bool:
        """Does the shortlist hold the top-p nucleus (and, for typical/min-p, all the mass that matters)?"""
        if self.s.typical_p < 1.0:
            return False  # typical sampling may keep tokens far down the list
        mass = torch.softmax(scores, dim=-1).topk(vals.shape[-1], dim=-1).values.sum(-1)
        return bool((mass >= self.s.top_p).all()) if self.s.top_p < 1.0 else True

    def _typical(self, vals: torch.Tensor) -> torch.Tensor:
        """transformers' TypicalLogitsWarper on sorted values: keep the tokens closest to the entropy."""
        logp = torch.log_softmax(vals, dim=-1)
        entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)
        shifted = (-logp - entropy).abs()
        order = shifted.argsort(dim=-1)
        cum = logp.gather(-1, order).exp().cumsum(-1)
        last = (cum < self.s.typical_p).sum(-1, keepdim=True).clamp(max=vals.shape[-1] - 1)
        threshold = shifted.gather(-1, order).gather(-1, last)
        return shifted <= threshold


def _sample_loop(dec: _Decoder, seeds: Sequence[int]) -> None:
    """Greedy or sampling, the whole batch at once; finished rows are dropped from the batch."""
    sampling = dec.s.decoding is Decoding.sample
    sampler = _Sampler(dec.s)
    row_seeds = torch.tensor(list(seeds), dtype=torch.long)
    active = list(range(len(dec.rows)))
    ids, mask = dec.ids, dec.mask
    run, logits, _ = _prefilled(dec, dec.prompt_width + dec.s.max_new_tokens, hidden=False)
    for step in range(dec.s.max_new_tokens):
        dec.check_stop()
        raw = torch.log_softmax(logits, dim=-1) if dec.logprobs else None  # processors may write in place
        scores = dec.processors(ids, logits)
        draws = torch.full((len(active),), step, dtype=torch.long)
        tokens = sampler(scores, row_seeds[active], draws).tolist() if sampling else greedy_tokens(scores)
        for b, r in enumerate(active):
            if dec.ban:
                draw = (sampler, row_seeds[r : r + 1], draws[:1]) if sampling else None
                tokens[b] = _unbanned(dec, dec.rows[r], scores[b], tokens[b], draw)
            dec.accept(r, tokens[b], step, float(raw[b, tokens[b]]) if raw is not None else None)
        token_t = torch.tensor(tokens, dtype=torch.long, device=dec.device)[:, None]
        ids = torch.cat([ids, token_t], dim=-1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        keep = [b for b, r in enumerate(active) if dec.rows[r].finish_reason is None]
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=dec.device)
            ids, mask, token_t = ids[index], mask[index], token_t[index]
            run.select(index)
            active = [active[b] for b in keep]
        logits, _ = run(token_t, mask, dec.position_ids(mask)[:, -1:])


def distinct(keys: Iterable[Hashable]) -> tuple[list[int], list[int]]:
    """Which keys repeat an earlier one (the prompts of rows that share a prefill): (for each key,
    the number of its distinct value in order of first appearance; where each distinct value first
    appears)."""
    seen: dict[Hashable, int] = {}
    which: list[int] = []
    firsts: list[int] = []
    for i, key in enumerate(keys):
        n = seen.setdefault(key, len(seen))
        if n == len(firsts):
            firsts.append(i)
        which.append(n)
    return which, firsts


def _prefilled(dec: _Decoder, capacity: int, hidden: bool) -> tuple[_Runner, torch.Tensor, torch.Tensor | None]:
    """A runner for the decoder's rows after the pass over their prompts, and that pass's outputs
    (logits, and last-layer states with `hidden`). Rows that repeat a prompt (`-n 5`) are prefilled
    once, then their keys and values repeated: the values each row gets alone (see
    scheduler._shared_prompts)."""
    ids, mask = dec.ids, dec.mask
    which, firsts = distinct(zip(map(tuple, ids.tolist()), map(tuple, mask.tolist())))
    rows = torch.tensor(firsts, device=ids.device)
    run = _Runner(dec.model, len(firsts), capacity)
    ids, mask = ids[rows], mask[rows]
    logits, states = run(ids, mask, dec.position_ids(mask), True) if hidden else run(ids, mask, dec.position_ids(mask))
    if len(firsts) < len(which):
        index = torch.tensor(which, device=ids.device)
        run.select(index)
        logits, states = logits[index], (states[index] if states is not None else None)
    return run, logits, states


def _unbanned(dec: Any, row: _Row, row_scores: torch.Tensor, token: int, draw: tuple[Any, torch.Tensor, torch.Tensor] | None) -> int:
    """Re-pick a row's token while it would write a banned word (EOS when nothing else is left);
    `draw` is (sampler, seed, draw number) for sampled rows: the same race, the banned token out."""
    tries = 0
    while dec.violates_ban(row, token):
        tries += 1
        row_scores = row_scores.clone()
        row_scores[token] = -float("inf")
        if tries > _BAN_RETRIES or torch.isinf(row_scores).all():
            return dec.eos
        token = int(draw[0](row_scores[None], draw[1], draw[2])[0]) if draw is not None else int(row_scores.argmax())
    return token


def _contrastive_loop(dec: _Decoder) -> None:
    """Contrastive search (Su et al. 2022): among the top-k tokens pick the one maximising
    (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j) over the context's last-layer states."""
    k, alpha = dec.s.k, dec.s.penalty_alpha
    active = list(range(len(dec.rows)))
    ids, mask = dec.ids, dec.mask
    run, logits, context = _prefilled(dec, dec.prompt_width + dec.s.max_new_tokens + 1, hidden=True)  # context: (B, L, H)
    assert context is not None
    ctx_mask = mask.bool()
    for step in range(dec.s.max_new_tokens):
        dec.check_stop()
        scores = dec.processors(ids, logits.float())
        for b, r in enumerate(active):  # banned candidates leave the top-k before it is taken
            _mask_banned_top(dec, dec.rows[r], scores[b], k)
        probs = torch.softmax(scores, dim=-1)
        top_p, top_ids = probs.topk(k, dim=-1)  # (B, k)
        bsz = top_ids.shape[0]
        run.repeat_interleave(k)
        mask_k = torch.cat([mask, mask.new_ones((bsz, 1))], dim=-1).repeat_interleave(k, dim=0)
        next_logits, hidden = run(top_ids.reshape(-1, 1), mask_k, dec.position_ids(mask_k)[:, -1:], hidden=True)
        h_next = hidden[:, -1, :]  # (B*k, H)
        ctx = context.repeat_interleave(k, dim=0)
        sim = torch.nn.functional.cosine_similarity(ctx, h_next[:, None, :], dim=-1)  # (B*k, L)
        sim = sim.masked_fill(~ctx_mask.repeat_interleave(k, dim=0), -float("inf"))
        penalty = sim.max(dim=-1).values.view(bsz, k)
        candidate_scores = (1.0 - alpha) * top_p - alpha * penalty
        candidate_scores = candidate_scores.masked_fill(top_p <= 0, -float("inf"))
        choice = candidate_scores.argmax(dim=-1)  # (B,)
        chosen = top_ids.gather(1, choice[:, None])  # (B, 1)
        flat = torch.arange(bsz, device=dec.device) * k + choice
        run.select(flat)
        logits = next_logits[flat]
        context = torch.cat([context, h_next[flat][:, None, :]], dim=1)
        ctx_mask = torch.cat([ctx_mask, ctx_mask.new_ones((bsz, 1))], dim=-1)
        ids = torch.cat([ids, chosen], dim=-1)
        mask = torch.cat([mask, mask.new_ones((bsz, 1))], dim=-1)
        for b, r in enumerate(active):
            dec.accept(r, int(chosen[b]), step)
        keep = [b for b, r in enumerate(active) if dec.rows[r].finish_reason is None]
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=dec.device)
            ids, mask, logits = ids[index], mask[index], logits[index]
            context, ctx_mask = context[index], ctx_mask[index]
            run.select(index)
            active = [active[b] for b in keep]


def _mask_banned_top(dec: _Decoder | RowRules, row: _Row, scores: torch.Tensor, width: int) -> None:
    """Mask banned tokens in place until the `width` best candidates of a row are all allowed."""
    if not dec.ban:
        return
    checked: set[int] = set()
    for _ in range(_BAN_RETRIES):
        top = [int(t) for t in scores.topk(width).indices if int(t) not in checked]
        bad = [t for t in top if dec.violates_ban(row, t)]
        checked.update(top)
        if not bad:
            return
        scores[bad] = -float("inf")


class _BanLogits:
    """Beam search: banned words leave each beam's best 2*beams candidates before beams are ranked."""

    def __init__(self, dec: _Decoder, width: int) -> None:
        self.dec, self.width = dec, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        tail = self.dec.rows[0].prompt_tail
        for b in range(input_ids.shape[0]):
            row = _Row(self.dec.tok, tail, [int(t) for t in input_ids[b, self.dec.prompt_width :]], before=self.dec.rows[0].before)
            row.text = row._decode(row.generated)
            _mask_banned_top(self.dec, row, scores[b], self.width)
        return scores


@torch.inference_mode()
def generate_beam(
    lm: Any, prompt: list[int], settings: GenerationSettings, extra_processors: ExtraProcessors | None = None,
    stop: Callable[[], bool] | None = None, joins: bool = True,
) -> list[RowResult]:
    """Beam search for one prompt; returns the best -n beams, best first.

    On aigc's native GPT-2 this runs `_beam_loop`, a port of transformers' vectorised beam search
    (same scores, length penalty, early-stop heuristic and finished-beam bookkeeping), so the beams
    are token for token those of transformers' `generate` (tested); other models use `generate`.
    """
    s = settings
    dec = _Decoder(lm, [prompt], s, None, extra_processors, joins=[joins])
    dec.stop = stop
    if dec.ban:
        dec.processors.append(_BanLogits(dec, 2 * s.beams))
    sequences = _beam_loop(dec, lm.model)
    results = []
    for seq in sequences:
        row = _Row(lm.tokenizer, "", before=dec.rows[0].before)
        for step, token in enumerate(seq):
            if row.finish_reason is not None:
                break
            row.push(token, step, dec.eos, s)
        results.append(row.result(False))
    return results


def _beam_loop(dec: _Decoder, model: Backend) -> list[list[int]]:  # kept whole: a line-by-line port of transformers' loop, compared with it in one read
    """transformers' `_beam_search` for one prompt (batch size 1), on any backend: same scores,
    length penalty, early-stop heuristic and finished-beam bookkeeping (tested against `generate`)."""
    s, nb, eos = dec.s, dec.s.beams, dec.eos
    length_penalty, early_stopping = s.length_penalty, s.early_stopping
    prompt = dec.ids  # (1, P): one prompt, no padding
    width = prompt.shape[1]
    max_len = width + s.max_new_tokens
    keep = 2 * nb  # candidates per step: enough for nb beams to survive one EOS each
    top_mask = torch.arange(keep) < nb
    fill = dec.pad if dec.pad is not None else (eos if eos is not None else 0)  # as transformers pads
    running = torch.full((1, nb, max_len), fill, dtype=torch.long)
    running[:, :, :width] = prompt
    sequences = running.clone()
    running_scores = torch.zeros((1, nb))
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((1, nb), -1e9)
    finished = torch.zeros((1, nb), dtype=torch.bool)
    unsatisfied = torch.ones((1, 1), dtype=torch.bool)
    running_idx = torch.full((1, nb, max_len - width), -1, dtype=torch.long)
    beam_idx = running_idx.clone()
    # the prompt is prefilled once and its keys and values repeated for every beam (transformers
    # prefills nb copies): the values each beam gets alone (see scheduler._shared_prompts)
    run = _Runner(model, 1, max_len)
    ids = prompt.to(dec.device)
    mask = torch.ones_like(ids)
    logits, _ = run(ids, mask, dec.position_ids(mask))
    run.repeat_interleave(nb)
    logits = logits.expand(nb, -1)
    cur = width
    while True:
        dec.check_stop()
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = dec.processors(running[0, :, :cur].to(dec.device), log_probs).cpu()
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(1, nb, vocab) + running_scores[:, :, None]).view(1, -1)
        top_lp, top_i = acc.topk(keep)
        src = top_i // vocab
        top_seqs = torch.take_along_dim(running, src[:, :, None], dim=1)
        top_seqs[:, :, cur] = top_i % vocab
        top_ridx = torch.take_along_dim(running_idx, src[:, :, None], dim=1)
        top_ridx[:, :, cur - width] = src
        hits = _beam_hits(dec, top_seqs[0, :, : cur + 1], width, cur + 1 >= max_len)[None]
        # the best unfinished candidates run on
        run_lp = top_lp + hits.float() * -1e9
        order = run_lp.topk(nb)[1]
        running = torch.take_along_dim(top_seqs, order[:, :, None], dim=1)
        running_scores = torch.take_along_dim(run_lp, order, dim=1)
        running_idx = torch.take_along_dim(top_ridx, order[:, :, None], dim=1)
        # finished candidates among the top nb join the finished beams if they score better
        just = hits & top_mask[None]
        lp = top_lp / ((cur + 1 - width) ** length_penalty)
        lp = lp + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        lp = lp + (~unsatisfied).float() * -1e9
        lp = lp + (~just).float() * -1e9
        merged = torch.cat((beam_scores, lp), dim=1).topk(nb)[1]
        sequences = torch.take_along_dim(torch.cat((sequences, top_seqs), 1), merged[:, :, None], dim=1)
        beam_idx = torch.take_along_dim(torch.cat((beam_idx, top_ridx), 1), merged[:, :, None], dim=1)
        finished = torch.take_along_dim(torch.cat((finished, just), 1), merged, dim=1)
        beam_scores = torch.take_along_dim(torch.cat((beam_scores, lp), 1), merged, dim=1)
        run.select(running_idx[0, :, cur - width].to(dec.device))
        cur += 1
        best_possible = running_scores[:, :1] / ((cur - width) ** length_penalty)
        worst_finished = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        unsatisfied = unsatisfied & (best_possible > worst_finished).any(-1, keepdim=True)
        if not (bool(unsatisfied.any()) and not (bool(finished.all()) and early_stopping is True) and not bool(hits.all())):
            break
        tokens = running[0, :, cur - 1 : cur].to(dec.device)
        mask = torch.ones((nb, cur), dtype=torch.long, device=dec.device)
        logits, _ = run(tokens, mask, torch.full((nb, 1), cur - 1, device=dec.device))
    top = sequences[0, : s.num_sequences]
    generated = int((beam_idx[0, : s.num_sequences] + 1).bool().sum(-1).max())
    return top[:, width : width + generated].tolist()


def _beam_hits(dec: _Decoder, seqs: torch.Tensor, width: int, at_max: bool) -> torch.Tensor:
    """Which candidate sequences end here: max length, EOS, or a stop string in their text."""
    if at_max:
        return torch.ones(seqs.shape[0], dtype=torch.bool)
    hits = seqs[:, -1] == dec.eos if dec.eos is not None else torch.zeros(seqs.shape[0], dtype=torch.bool)
    if dec.s.stop:
        texts = dec.tok.batch_decode(seqs[:, width:].tolist(), clean_up_tokenization_spaces=False)
        hits |= torch.tensor([find_stop(t, dec.s.stop) is not None for t in texts])
    return hits
