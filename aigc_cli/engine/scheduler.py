"""Continuous batching: rows with their own settings join a running decode batch at any step and
leave it when they finish; one decode step is one forward pass over every running row.

    sched = Scheduler(lm, max_rows=64)
    sched.submit(RowSpec(key="a", prompt_ids=ids, settings=settings, seed=row_seed(7, "a", 0)))
    while sched.busy:
        for event in sched.step():   # Token and Finished events, as they happen
            ...

Greedy, sampled and contrastive-search rows run here (beam search keeps its own loop per request,
see `engine.py`). A contrastive row holds one slot per branch (its top-k candidates), all sharing
every earlier position: each step evaluates the k candidates as k ordinary decode rows, the row
keeps the best by Su et al.'s score, and the chosen branch's newest keys and values are copied into
the others. Rows that join with one prompt (the sequences of `-n 5`, repeated prompts) prefill it
once; the others take copies of its keys and values. A row's tokens depend only on its prompt,
settings and seed: sampling draws with noise keyed by (row seed, step, token), and the batch
around a row moves its logits by ~1e-6 at most, which a Gumbel race does not notice.

Faults are contained: whatever is done for one row (its rules, processors, draw, text, stop
checks) that raises ends that row alone with a `Failed` event; a forward pass that raises (out of
memory) is retried on the batch split in halves, and new rows alone, until only a row that cannot
run at all fails. The other rows go on as if nothing happened.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from aigc_cli.engine.decoding import RowResult, RowRules, _mask_banned_top, _Row, _Sampler, _unbanned, distinct, greedy_tokens
from aigc_cli.engine.processors import MinNewTokens, ProcessorList
from aigc_cli.core.settings import Decoding, GenerationSettings

if TYPE_CHECKING:
    from aigc_cli.models.gpt2 import Stepped
    from aigc_cli.models.loading import LoadedModel


@dataclass
class RowSpec:
    """One sequence to generate."""

    key: Hashable  # the caller's handle for this row
    prompt_ids: list[int]
    settings: GenerationSettings  # resolved; greedy, sample or contrastive
    seed: int  # the row's own seed (decoding.row_seed)
    on_text: Callable[[str], None] | None = None  # called with the row's whole text as it grows
    logprobs: bool = False  # record each token's log-probability under the unprocessed model
    top_logprobs: int = 0  # and this many of the most likely tokens at each step, with theirs
    joins: bool = True  # the text goes on from the prompt's last token (requests.joins)


@dataclass
class Token:
    key: Hashable
    token: int
    text: str  # the row's whole text so far (stop strings cut)
    logprob: float | None = None  # with RowSpec.logprobs
    top: list[tuple[int, float]] | None = None  # with RowSpec.top_logprobs


@dataclass
class Finished:
    key: Hashable
    result: RowResult


@dataclass
class Failed:
    """A row that could not go on: something done for it raised (it alone), or the engine stopped."""

    key: Hashable
    error: BaseException


Event = Token | Finished | Failed


@dataclass
class _Live:
    spec: RowSpec
    row: _Row
    rules: RowRules
    processors: ProcessorList  # those that read the row's tokens (not `hold`)
    hold: MinNewTokens | None = None  # min_new_tokens: EOS held back, applied to a group of rows at once
    step: int = 0
    top: list[list[tuple[int, float]]] | None = None
    # contrastive search: the candidates that the last forward pass evaluated, one per slot
    branches: list[int] | None = None  # their tokens, most likely first
    branch_p: torch.Tensor | None = None  # (k,) their probabilities
    parent: torch.Tensor | None = None  # (V,) the raw logits they were taken from
    context: torch.Tensor | None = None  # (positions, E) last-layer states of the sequence so far

    @property
    def reserve(self) -> int:  # positions this row may fill
        return len(self.spec.prompt_ids) + self.spec.settings.max_new_tokens

    @property
    def contrastive(self) -> bool:
        return self.spec.settings.decoding is Decoding.contrastive

    @property
    def held_eos(self) -> int | None:
        """The EOS token when min_new_tokens holds it back from this row's next token, else None."""
        return self.hold.eos if self.hold is not None and self.hold.holds(len(self.row.generated)) else None


class Scheduler:
    """Rows wait in a queue (first come, first served), then take a KV slot; at most `max_rows`
    run at once and, with `kv_budget` (bytes), no more than fit it at their full length."""

    # Tests only: called with each running row's spec as the step works on it, to inject a fault
    # that belongs to one row (request validation cannot catch it first).
    fault: Callable[[RowSpec], None] | None = None

    def __init__(self, lm: LoadedModel, max_rows: int, kv_budget: int | None = None, refill: bool = True) -> None:
        """`refill=False` is static batching (kept for benchmarks): rows join only an empty batch,
        so a batch runs until its longest row ends."""
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.max_rows, self.kv_budget, self.refill = max(1, max_rows), kv_budget, refill
        self.queue: deque[RowSpec] = deque()
        self.live: list[_Live] = []  # per slot (a contrastive row is in one slot per branch)
        self.branch: list[int] = []  # per slot: which of its row's candidates it holds (0 for others)
        self.slots = self.model.new_slots()
        self.logits: torch.Tensor | None = None  # (slots, V): what each slot's row chooses from next
        self.hidden: torch.Tensor | None = None  # (slots, E) last-layer states, while contrastive rows run
        self._rules: dict[GenerationSettings, RowRules] = {}
        self._cancel: set[Hashable] = set()
        self._lone_token: torch.Tensor | None = None  # `_step_lone`'s token, written in place each step
        self._lone_view: Any = None  # its numpy view (on the CPU)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.live)

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.live)

    def submit(self, spec: RowSpec) -> None:
        """Queue a row; what its settings ask for (banned words' tokens, processors) is prepared now,
        so that a row that cannot be decoded is refused here, by raising, before it takes a slot."""
        if spec.settings.mode.runs_on != "scheduler":
            raise ValueError(f"the scheduler runs greedy, sampled and contrastive rows, not {spec.settings.decoding.value}")
        self._rules_for(spec.settings)
        self.queue.append(spec)

    def _rules_for(self, settings: GenerationSettings) -> RowRules:
        rules = self._rules.get(settings)
        if rules is None:
            rules = self._rules[settings] = RowRules(self.tok, settings)
        return rules

    def last_rows_submitted(self) -> None:
        """No more rows will come (the end of a batch file): the waiting rows start longest first,
        so that the run does not end with a long row decoding alone (a step costs nearly as much
        for one row as for dozens). Each row's tokens do not depend on when it starts."""
        self.queue = deque(sorted(self.queue, key=lambda spec: -len(spec.prompt_ids) - spec.settings.max_new_tokens))

    def cancel(self, key: Hashable) -> None:
        """Drop a row: a queued one at once, a running one (and its slot) at the next step."""
        self._cancel.add(key)

    def step(self) -> list[Event]:
        """Pick one token for every running row, free the slots of rows that finished (or failed),
        admit what fits into the free slots, then one forward pass: the running rows' new tokens and
        the new rows' prompts together. Returns what happened, in slot order (contrastive rows last)."""
        if len(self.live) == 1 and not self.queue and not self._cancel and not self.live[0].contrastive:
            return self._step_lone()
        return self._step_many()

    def _step_many(self) -> list[Event]:
        self._drop_cancelled()
        events: list[Event] = []
        tokens: list[int] = []
        if self.live:
            tokens = self._choose(events)
        joining = self._admit()
        if not self.live and not joining:
            self._idle()
            return events
        self._forward(tokens, joining, events)
        return events

    def _idle(self) -> None:
        self.logits = self.hidden = None
        self.slots = self.model.new_slots()  # give the cache's memory back

    def _step_lone(self) -> list[Event]:
        """`step` for one running greedy or sampled row with nothing waiting or cancelled (batch-1
        decoding: a prompt at a terminal, a server with one client): the same pick, accept and
        forward pass, without what many rows need (groups, slot order, admission). After every
        forward pass that Python runs cold (the weights have streamed through the caches since it
        last ran), so each call left out counts: see bench/RESULTS-decode.md. A row that finishes
        or fails leaves as in `step`; a forward pass that raises goes through `_forward`, whose
        retry fails the row alone."""
        live, events, tokens = self.live[0], list[Event](), [0]
        assert self.logits is not None
        try:
            self._pick_group(self.logits, [0], tokens)
            raw, top = self._raw_logprobs(self.logits[0], tokens[0], live) if live.spec.logprobs else (None, None)
            done = self._accept(live, tokens[0], raw, top, events)
        except Exception as exc:  # noqa: BLE001 - the row fails (alone: it is the only one)
            events.append(Failed(live.spec.key, exc))
            done = True
        if done:
            self._remove([0])
            self._idle()
            return events
        if self._lone_token is None:
            self._lone_token = torch.zeros(1, dtype=torch.long, device=self.model.device)
            self._lone_view = self._lone_token.numpy() if self._lone_token.is_cpu else None
        if self._lone_view is not None:
            self._lone_view[0] = tokens[0]  # the same memory: no new tensor (~30 us, cold)
        else:
            self._lone_token.fill_(tokens[0])
        try:
            self.logits = self.model.step(self._lone_token, self.slots, [])  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - as any step's pass: retried, then the row fails
            self._forward(tokens, [], events)
        return events

    def _choose(self, events: list[Event]) -> list[int]:
        """Each running row's next token accepted (or its row finished or failed); returns the
        tokens of the rows that go on, in their (possibly reordered) slots."""
        assert self.logits is not None
        failed: dict[int, BaseException] = {}
        picked = self._pick(self.logits, failed)
        done = []
        for b, (live, token) in enumerate(zip(self.live, picked)):
            if live.contrastive or b in failed:
                continue
            try:
                raw, top = self._raw_logprobs(self.logits[b], token, live) if live.spec.logprobs else (None, None)
                if self._accept(live, token, raw, top, events):
                    done.append(b)
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                failed[b] = exc
        forks = []
        for live, slots in self._branches():
            try:
                if self._contrastive_step(live, slots, events):
                    done.extend(slots)
                    continue
            except Exception as exc:  # noqa: BLE001 - this row (all its branches) fails alone
                failed.update((b, exc) for b in slots)
                continue
            assert live.branches is not None
            for b in slots:
                picked[b] = live.branches[self.branch[b]]
            if len(slots) < len(live.branches):  # just prefilled: its branches take their slots
                forks.append(live)
        self._report_failed(failed, events)
        tokens = [picked[i] for i in self._remove(done + sorted(failed))]
        for live in forks:
            assert live.branches is not None
            more = len(live.branches) - 1
            self.slots.fork(next(b for b, x in enumerate(self.live) if x is live), more)
            self.live += [live] * more
            self.branch += list(range(1, more + 1))
            tokens += live.branches[1:]
        for i, j in self.slots.tidy():  # the cache reordered its slots: the rows follow
            self.live[i], self.live[j] = self.live[j], self.live[i]
            self.branch[i], self.branch[j] = self.branch[j], self.branch[i]
            tokens[i], tokens[j] = tokens[j], tokens[i]
        return tokens

    def _report_failed(self, failed: dict[int, BaseException], events: list[Event]) -> None:
        reported: set[int] = set()
        for b, exc in sorted(failed.items()):
            live = self.live[b]
            if id(live) not in reported:  # a contrastive row holds several slots: one event
                reported.add(id(live))
                events.append(Failed(live.spec.key, exc))

    def _forward(self, tokens: list[int], joining: list[RowSpec], events: list[Event]) -> None:
        """The step's forward pass; the joining rows become running ones. A pass that raises is
        retried in parts (`_split_forward`): only rows that cannot run even alone fail."""
        token_t = torch.tensor(tokens, dtype=torch.long, device=self.model.device) if tokens else None
        states = any(x.contrastive for x in self.live) or any(spec.settings.decoding is Decoding.contrastive for spec in joining)
        firsts, copies = _shared_prompts(joining) if not states else (joining, [])
        try:
            out = self.model.step(token_t, self.slots, [spec.prompt_ids for spec in firsts], states=states)
            parts: _Parts = _Parts.of(out)
            admitted, failed_running = firsts, list[int]()
        except Exception:  # noqa: BLE001 - no single row to blame: split the batch
            parts, admitted, failed_running = self._split_forward(tokens, joining, states, events)
            copies = []  # each new row was prefilled on its own
        if copies:
            parts, admitted = self._fork_copies(parts, firsts, copies, events)
        for j, spec in enumerate(admitted):
            live = self._start(spec)
            if live.contrastive and parts.prompts is not None:
                live.context = parts.prompts[j]
            self.live.append(live)
            self.branch.append(0)
        logits, hidden = parts.logits, parts.hidden
        if failed_running:
            self._report_failed({b: parts.errors[b] for b in failed_running}, events)
            order = torch.tensor(self._remove(failed_running), dtype=torch.long, device=logits.device)
            logits = logits[order]
            hidden = hidden[order] if hidden is not None else None
        self.logits, self.hidden = (logits, hidden) if self.live else (None, None)

    def _fork_copies(
        self, parts: _Parts, firsts: list[RowSpec], copies: list[tuple[int, RowSpec]], events: list[Event]
    ) -> tuple[_Parts, list[RowSpec]]:
        """After a pass that prefilled `firsts`, the rows whose prompt is a first's (`copies`, (index
        in firsts, spec), grouped by that index) take slots after the last, each a copy of its
        first's prompt keys and values, and its logits: (the step's outputs, the rows admitted). If
        that fails, the copies fail (Failed events) and leave no slot behind; the others go on."""
        rows = self.slots.rows
        start = rows - len(firsts)
        try:
            for at, times in sorted(Counter(at for at, _ in copies).items()):
                self.slots.fork(start + at, times)
            index = torch.tensor([len(parts.logits) - len(firsts) + at for at, _ in copies], dtype=torch.long, device=parts.logits.device)
            return _Parts(torch.cat([parts.logits, parts.logits[index]])), firsts + [spec for _, spec in copies]
        except Exception as exc:  # noqa: BLE001 - these rows fail alone
            while self.slots.rows > rows:
                self.slots.remove(self.slots.rows - 1)
            events.extend(Failed(spec.key, exc) for _, spec in copies)
            return parts, firsts

    def _split_forward(
        self, tokens: list[int], joining: list[RowSpec], states: bool, events: list[Event]
    ) -> tuple[_Parts, list[RowSpec], list[int]]:
        """The running rows in halves until each part runs (a row that fails alone is dropped),
        then each new row alone (one that fails alone is refused): (the parts' outputs, the new
        rows that were admitted, the running slots that failed)."""
        rows = len(tokens)
        logits: list[torch.Tensor | None] = [None] * rows
        hidden: list[torch.Tensor | None] = [None] * rows
        errors: dict[int, BaseException] = {}
        pending = [(0, rows)] if rows else []
        while pending:
            lo, hi = pending.pop()
            ids = torch.tensor(tokens[lo:hi], dtype=torch.long, device=self.model.device)
            try:
                part = _Parts.of(self.model.step(ids, self.slots, [], states=states, first=lo))
            except Exception as exc:  # noqa: BLE001 - smaller parts, down to one row
                if hi - lo == 1:
                    errors[lo] = exc
                else:
                    pending += [(lo + (hi - lo) // 2, hi), (lo, lo + (hi - lo) // 2)]
                continue
            for i in range(hi - lo):
                logits[lo + i] = part.logits[i]
                hidden[lo + i] = part.hidden[i] if part.hidden is not None else None
        admitted, prompts = [], []
        for spec in joining:
            try:
                part = _Parts.of(self.model.step(None, self.slots, [spec.prompt_ids], states=states))
            except Exception as exc:  # noqa: BLE001 - this new row cannot run at all
                events.append(Failed(spec.key, exc))
                continue
            admitted.append(spec)
            logits.append(part.logits[0])
            hidden.append(part.hidden[0] if part.hidden is not None else None)
            if part.prompts is not None:
                prompts.append(part.prompts[0])
        vocab = self.model_vocab(logits)
        filled = [x if x is not None else torch.zeros(vocab, device=self.model.device) for x in logits]
        out = _Parts(
            torch.stack(filled) if filled else torch.empty(0, vocab),
            torch.stack([h if h is not None else torch.zeros_like(next(x for x in hidden if x is not None)) for h in hidden])
            if states and any(h is not None for h in hidden) else None,
            prompts if states else None,
            errors,
        )
        return out, admitted, sorted(errors)

    @staticmethod
    def model_vocab(logits: list[torch.Tensor | None]) -> int:
        return next((x.shape[-1] for x in logits if x is not None), 1)

    def _accept(
        self, live: _Live, token: int, raw: float | None, top: list[tuple[int, float]] | None, events: list[Event]
    ) -> bool:
        """Append a row's token and report it; returns whether the row finished."""
        if Scheduler.fault is not None:
            Scheduler.fault(live.spec)
        grew = live.row.push(token, live.step, live.rules.eos, live.spec.settings, raw)
        live.step += 1
        if grew:
            if top is not None:
                live.top = live.top if live.top is not None else []
                live.top.append(top)
            events.append(Token(live.spec.key, token, live.row.text, raw, top))
            if live.spec.on_text is not None:
                live.spec.on_text(live.row.text)
        if live.row.finish_reason is None:
            return False
        events.append(Finished(live.spec.key, live.row.result(live.spec.logprobs, live.top, None if grew else top)))
        return True

    # -- contrastive search ---------------------------------------------------------------------

    def _branches(self) -> list[tuple[_Live, list[int]]]:
        """Each contrastive row with its slots, in the order of its candidates."""
        rows: dict[int, tuple[_Live, list[int]]] = {}
        for b, live in enumerate(self.live):
            if live.contrastive:
                rows.setdefault(id(live), (live, []))[1].append(b)
        for _, slots in rows.values():
            slots.sort(key=self.branch.__getitem__)
        return list(rows.values())

    def _contrastive_step(self, live: _Live, slots: list[int], events: list[Event]) -> bool:
        """Choose among the candidates the last pass evaluated (Su et al. 2022: the most likely
        penalised by its closest likeness to the context), then take the next candidates from the
        chosen one's logits. A row just prefilled only takes its first candidates. Returns whether
        the row finished."""
        assert self.logits is not None
        s = live.spec.settings
        k = s.k
        parent = self.logits[slots[0]]
        if live.branches is not None:
            assert self.hidden is not None and live.context is not None and live.branch_p is not None and live.parent is not None
            h = self.hidden[slots]  # (k, E)
            likeness = torch.nn.functional.cosine_similarity(live.context[None, :, :], h[:, None, :], dim=-1)
            scores = (1.0 - s.penalty_alpha) * live.branch_p - s.penalty_alpha * likeness.max(dim=-1).values
            c = int(scores.masked_fill(live.branch_p <= 0, -float("inf")).argmax())
            token = live.branches[c]
            raw, top = self._raw_logprobs(live.parent, token, live) if live.spec.logprobs else (None, None)
            if self._accept(live, token, raw, top, events):
                return True
            live.context = torch.cat([live.context, h[c : c + 1]])
            self.slots.copy_position(slots[c], [b for b in slots if b != slots[c]], self.slots.lengths[slots[c]] - 1)
            parent = self.logits[slots[c]]
        scores = self._processed(live, parent[None].float()).clone()
        _mask_banned_top(live.rules, live.row, scores[0], k)  # banned candidates leave before the top-k is taken
        live.branch_p, top_ids = torch.softmax(scores[0], dim=-1).topk(k)
        live.branches, live.parent = top_ids.tolist(), parent
        return False

    # -- admission and removal -------------------------------------------------------------

    def _fits(self, rows: int, slots: int, longest: int) -> bool:
        """Can `rows` sequences holding `slots` KV slots run at once (a contrastive row holds one
        per branch)? One sequence always may."""
        if rows == 1:
            return True
        if rows > self.max_rows:
            return False
        return self.kv_budget is None or slots * longest * self.slots.bytes_per_position <= self.kv_budget

    def _admit(self) -> list[RowSpec]:
        """Queued rows that fit now, first come first served; their slots are reserved."""
        if not self.queue or (self.live and not self.refill):
            return []
        joining: list[RowSpec] = []
        longest = max((x.reserve for x in self.live), default=0)
        heads = [x for b, x in enumerate(self.live) if self.branch[b] == 0]
        rows, slots = len(heads), sum(x.spec.settings.kv_rows() for x in heads)
        while self.queue:
            spec = self.queue[0]
            if spec.key in self._cancel:
                self._cancel.discard(spec.key)
                self.queue.popleft()
                continue
            need = max(longest, len(spec.prompt_ids) + spec.settings.max_new_tokens)
            if not self._fits(rows + 1, slots + spec.settings.kv_rows(), need):
                break
            joining.append(self.queue.popleft())
            rows, slots, longest = rows + 1, slots + spec.settings.kv_rows(), need
        if joining:
            have_slots, have_pos = self.slots.capacity
            # grow in steps so that a stream of arrivals does not copy the cache at every step; an
            # empty cache takes exactly what its first rows need (one 900-token prompt: 8 slots of
            # zeros were 530 MB and half a second before its first token)
            grow = slots > have_slots > 0
            want = max(slots, min(self.max_rows, max(2 * have_slots, 8))) if grow else slots
            if self.kv_budget is None:
                self.slots.reserve(want, longest)
            elif slots <= have_slots and longest <= have_pos and have_slots * have_pos * self.slots.bytes_per_position <= self.kv_budget:
                pass  # the cache already holds them, within the budget
            else:  # exactly what the budget holds at this length (earlier, longer rows may have left)
                fit = self.kv_budget // (longest * self.slots.bytes_per_position)
                self.slots.resize(max(slots, min(want, fit)), max(longest, max(self.slots.lengths, default=0)))
        return joining

    def _start(self, spec: RowSpec) -> _Live:
        rules = self._rules_for(spec.settings)
        tail = self.tok.decode(spec.prompt_ids[-16:], clean_up_tokenization_spaces=False)
        before = spec.prompt_ids[-1] if spec.prompt_ids and spec.joins else None
        processors = rules.processors(len(spec.prompt_ids))
        # MinNewTokens comes last and only writes -inf, which every processor before it keeps: it
        # can go first, for all the rows of a group in one write (`_held_back`)
        hold = processors.pop() if processors and isinstance(processors[-1], MinNewTokens) else None
        return _Live(spec, _Row(self.tok, tail, before=before), rules, processors, hold)

    def _drop_cancelled(self) -> None:
        if not self._cancel or not self.live:
            return
        gone = [b for b, live in enumerate(self.live) if live.spec.key in self._cancel]
        if not gone:
            return
        self._cancel.difference_update(self.live[b].spec.key for b in gone)
        order = self._remove(gone)
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(order, dtype=torch.long, device=self.logits.device)] if order else None
        if self.hidden is not None:
            self.hidden = self.hidden[torch.tensor(order, dtype=torch.long, device=self.hidden.device)] if order else None
        if not self.live:
            self.slots = self.model.new_slots()

    def _remove(self, doomed: list[int]) -> list[int]:
        """Free these rows' slots (the last row moves into each); returns, for each remaining
        slot, the row it held before."""
        order = list(range(len(self.live)))
        for slot in sorted(doomed, reverse=True):
            last = len(order) - 1
            self.slots.remove(slot)
            order[slot] = order[last]
            order.pop()
            self.live[slot] = self.live[last]
            self.live.pop()
            self.branch[slot] = self.branch[last]
            self.branch.pop()
        return order

    # -- choosing tokens -----------------------------------------------------------------------

    def _raw_logprobs(self, logits: torch.Tensor, token: int, live: _Live) -> tuple[float, list[tuple[int, float]] | None]:
        """The token's log-probability under the unprocessed model, and the top alternatives' when asked."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = live.spec.top_logprobs
        if not k:
            return float(logp[token]), None
        values, ids = logp.topk(min(k, logp.numel()))
        return float(logp[token]), list(zip(ids.tolist(), values.tolist()))

    def _pick(self, logits: torch.Tensor, failed: dict[int, BaseException]) -> list[int]:
        """One token per live row: rows that share settings are processed and drawn together. When
        a group's work raises, its rows are drawn one by one, and a row that raises alone goes
        into `failed` (slot -> error)."""
        tokens = [0] * len(self.live)
        groups: dict[tuple[object, ...], list[int]] = {}
        for b, live in enumerate(self.live):
            if not live.contrastive:  # contrastive rows choose among their branches (_contrastive_step)
                groups.setdefault(_Sampler.key(live.spec.settings), []).append(b)
        for rows in groups.values():
            try:
                self._pick_group(logits, rows, tokens)
            except Exception:  # noqa: BLE001 - find the row at fault
                for b in rows:
                    try:
                        self._pick_group(logits, [b], tokens)
                    except Exception as exc:  # noqa: BLE001 - it fails alone
                        failed[b] = exc
        return tokens

    def _pick_group(self, logits: torch.Tensor, rows: list[int], tokens: list[int]) -> None:
        """Process and draw the tokens of rows that share their sampling settings."""
        settings = self.live[rows[0]].spec.settings
        scores = logits if len(rows) == len(self.live) else logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        sampling = settings.decoding is Decoding.sample
        if not sampling and not any(self.live[b].processors or self.live[b].rules.ban for b in rows):
            self._pick_greedy(scores, rows, tokens)
            return
        if len(rows) == 1:  # one row (batch-1 decoding): no slicing and joining
            scores = self._processed(self.live[rows[0]], scores)
        else:
            scores = self._held_back(scores, [self.live[b] for b in rows])
            if any(self.live[b].processors for b in rows):  # history-based: each row on its own sequence
                scores = torch.cat([self._processed(self.live[b], scores[i : i + 1], held=True) for i, b in enumerate(rows)])
        sampler = _Sampler(settings)
        if sampling:
            seeds = torch.tensor([self.live[b].spec.seed for b in rows], dtype=torch.long)
            draws = torch.tensor([self.live[b].step for b in rows], dtype=torch.long)
            picked = sampler(scores, seeds, draws).tolist()
        else:
            picked = greedy_tokens(scores)
        for i, b in enumerate(rows):
            live = self.live[b]
            if Scheduler.fault is not None:
                Scheduler.fault(live.spec)
            token = picked[i]
            if live.rules.ban:
                draw = (sampler, seeds[i : i + 1], draws[i : i + 1]) if sampling else None
                token = _unbanned(live.rules, live.row, scores[i], token, draw)
            tokens[b] = token

    def _pick_greedy(self, scores: torch.Tensor, rows: list[int], tokens: list[int]) -> None:
        """`_pick_group` for greedy rows without processors or bans: the argmax of the raw scores,
        and only where a row's min_new_tokens holds EOS back and EOS won, that row again with EOS at
        -inf: the same tokens as masking first, without copying every row's scores each step (a
        cold copy of GPT-2's 50,257 scores took ~0.09 ms of a ~9 ms int8 token)."""
        picked = greedy_tokens(scores)
        for i, b in enumerate(rows):
            live = self.live[b]
            if Scheduler.fault is not None:
                Scheduler.fault(live.spec)
            eos = live.held_eos
            if eos is not None and picked[i] == eos:
                picked[i] = greedy_tokens(self._held_back(scores[i : i + 1], [live]))[0]
            tokens[b] = picked[i]

    @staticmethod
    def _held_back(scores: torch.Tensor, rows: list[_Live]) -> torch.Tensor:
        """`scores` (one row each of `rows`) with EOS at -inf where a row's min_new_tokens holds it back."""
        held = [(i, eos) for i, live in enumerate(rows) if (eos := live.held_eos) is not None]
        if not held:
            return scores
        scores = scores.clone()
        for i, eos in held:
            scores[i, eos] = -float("inf")
        return scores

    def _processed(self, live: _Live, scores: torch.Tensor, held: bool = False) -> torch.Tensor:
        """One row's scores (1, V) through its processors; `held`: its EOS hold is applied already."""
        if not held:
            scores = self._held_back(scores, [live])
        if not live.processors:
            return scores
        ids = torch.tensor([live.spec.prompt_ids + live.row.generated], dtype=torch.long, device=scores.device)
        return live.processors(ids, scores)


def _shared_prompts(joining: list[RowSpec]) -> tuple[list[RowSpec], list[tuple[int, RowSpec]]]:
    """The joining rows whose prompt no earlier joining row has (prefilled), and the others as (index
    of the first row with their prompt, row), grouped by that index: the sequences of one prompt
    (`generate -n 5`, a request's `n`) and repeated prompts are prefilled once and share the prompt's
    keys and values. A row gets the logits it gets prefilled alone: the same bits on the CPU (a
    row's values do not depend on its batch mates there; measured for float32, int8 and fp16),
    within the ~1e-6 a batch moves them elsewhere, which a seeded draw does not notice."""
    which, firsts = distinct(tuple(spec.prompt_ids) for spec in joining)
    starts = set(firsts)
    copies = sorted(((which[i], spec) for i, spec in enumerate(joining) if i not in starts), key=lambda c: c[0])  # stable: arrival order
    return [joining[i] for i in firsts], copies


@dataclass
class _Parts:
    """A step's forward output: logits (rows, V), hidden states or None, new rows' prompt states
    or None, and (after a split) the errors of the running slots that could not run."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    prompts: list[torch.Tensor] | None = None
    errors: dict[int, BaseException] = field(default_factory=dict)

    @classmethod
    def of(cls, out: torch.Tensor | Stepped) -> _Parts:
        if isinstance(out, torch.Tensor):
            return cls(out)
        return cls(out.logits, out.hidden, out.prompts)
