"""One /v1/completions request: its cost claimed and its prompts checked, its work run through the
engine loop (the same rows and seeds as `aigc generate`), its response or stream of chunks built.

The completions protocol as vLLM and OpenAI give it, to the token: a generated end-of-text (or stop
token) is not part of the text but is a token of the completion, so it appears in `tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`, `token_ids` and `usage`; each `top_logprobs`
entry holds the chosen token besides the k most likely (up to k+1 entries); with `echo`, the
prompt's own tokens come first (the first one with no log-probability: nothing predicts it).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from aigc_cli.core.errors import RecordError
from aigc_cli.core.textrules import find_stop, stream_safe_length
from aigc_cli.engine.engine import Engine
from aigc_cli.engine.loop import Done, QueueFullError, StoppingError, Ticket, TooBigError
from aigc_cli.engine.requests import Cancelled, Completion, joins
from aigc_cli.engine.requests import Request as EngineRequest
from aigc_cli.engine.scheduler import Failed, Finished, Token
from aigc_cli.engine.seeds import run_seed
from aigc_cli.frontends.server.prepare import Prepared, refusal
from aigc_cli.frontends.server.state import ServerState
from aigc_cli.protocol.completions import BY_PARAM_NAME, finish_reason, logprobs_body, usage
from aigc_cli.protocol.errors import APIError, bad

Alternatives = list[tuple[int, float]]


@dataclass
class _Choice:
    prompt: int
    index: int  # sequence number within its prompt
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[Alternatives | None] = field(default_factory=list)
    end: tuple[int, float | None, Alternatives | None] | None = None  # the end-of-text or stop token, when one ended it
    streamed_tokens: int = 0  # tokens whose logprobs were streamed

    @property
    def tokens(self) -> list[int]:
        """The completion's tokens as the protocol counts them: the end token included."""
        return self.token_ids + ([self.end[0]] if self.end is not None else [])

    def apply(self, event: Token | Finished | Completion) -> None:
        if isinstance(event, Completion):  # static modes: the whole sequence at once
            self.text, self.finish, self.token_ids = event.text, event.finish_reason, list(event.token_ids)
            self.logprobs = list(event.logprobs or [])
            self.top = list(event.top_logprobs or [])
            self._ended(event.end_token, event.end_logprob, event.end_top)
        elif isinstance(event, Token):
            self.text = event.text
            self.token_ids.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top)
        else:
            result = event.result
            self.text, self.finish = result.text, result.finish_reason
            self._ended(result.end_token, result.end_logprob, result.end_top)

    def _ended(self, token: int | None, logprob: float | None, top: Alternatives | None) -> None:
        if token is not None:
            self.end = (token, logprob, top)


class CompletionJob:
    """One request, its prompts already tokenized and checked off the event loop (prepare.py):
    its cost claimed on the engine loop before anything is built (503 when the server is full),
    then its rows run on the engine and its response body or stream of chunks built."""

    def __init__(
        self, state: ServerState, engine: Engine, prepared: Prepared, log_usage: dict[str, Any]
    ) -> None:
        assert state.loop is not None
        req = prepared.req
        self.state, self.engine, self.loop, self.req = state, engine, state.loop, req
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.arrived = time.monotonic()
        self.log_usage = log_usage
        self.seed = run_seed(req.seed)
        self.prompt_ids: list[list[int]] = prepared.prompt_ids  # tokenized and checked (prepare.py)
        self.prompt_texts: list[str] = prepared.prompt_texts
        wanted = req.indices if req.indices is not None else range(req.best_of)
        self.choices = {(p, i): _Choice(p, i) for p in range(len(req.prompts)) for i in wanted}
        self.echo_logprobs: list[list[Any]] = []
        self.ticket: Ticket | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._texts: dict[int, str] = {}

    @property
    def cost(self) -> int:
        """What the request claims of the engine: its sequences (each beam or contrastive branch
        counted), and one per prompt whose log-probabilities are scored."""
        per_prompt = 0 if self.req.score_only else len(self.choices) // max(1, len(self.req.prompts)) * self.req.settings.kv_rows()
        scored = 1 if self.req.echo and self.req.logprobs is not None else 0
        return len(self.req.prompts) * (per_prompt + scored)

    async def start(self) -> None:
        """Claim the engine (503 or 400 when it cannot take this); the prompts come tokenized and
        checked (prepare.py), only their memory is checked again here: the helper process that
        prepares a large body has no weights to estimate it from."""
        try:
            self.ticket = self.loop.admit(self.cost)
        except QueueFullError as exc:
            raise APIError(503, f"the server is busy: {exc}", code="queue_full") from None
        except TooBigError as exc:
            raise bad(f"{exc}", self._costliest_field(), "too_many_sequences") from None
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        self.state.jobs.add(self)
        try:
            self._check_memory()
        except BaseException:
            self.close()
            raise

    def _costliest_field(self) -> str:
        """The request field that multiplies the cost most: the prompts, or per prompt the beams
        (or contrastive branches), best_of, n."""
        req, per_prompt = self.req, self.cost // max(1, len(self.req.prompts))
        if len(req.prompts) > per_prompt:
            return "prompt"
        kv = req.settings.mode.kv_rows
        if req.settings.kv_rows() > 1 and kv:
            return BY_PARAM_NAME.get(kv, kv)
        return "best_of" if req.best_of > req.n else "n"

    def close(self) -> None:
        """The request is over (or its client left): its work stops, its claim is freed."""
        self.state.jobs.discard(self)
        if self.ticket is not None:
            self.loop.release(self.ticket)

    def abort(self, error: APIError) -> None:
        """End the request now with `error` (the server's shutdown timeout has passed)."""
        if self._queue is not None and self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._queue.put_nowait, error)
        self.close()

    def _check_memory(self) -> None:
        """Beam search and contrastive search keep rows in proportion to the longest prompt: a
        400 when memory cannot hold them (O(prompt) on one prompt: no thread needed)."""
        if self.req.settings.kv_rows() > 1:
            try:
                self.engine.check_ids(max(self.prompt_ids, key=len), self.req.settings, self.req.generated_tokens)
            except RecordError as exc:
                raise refusal(exc, "", self.req) from None

    def _requests(self) -> list[EngineRequest]:
        record = self.req.record_id
        return [
            EngineRequest(
                id=record if record is not None else p,
                prompt=self.prompt_texts[p],
                settings=self.req.settings,
                seed=self.seed,
                indices=tuple(i for (q, i) in self.choices if q == p),
                prompt_ids=tuple(ids),
            )
            for p, ids in enumerate(self.prompt_ids)
        ]

    # -- running ----------------------------------------------------------------------------

    async def _events(self) -> AsyncIterator[tuple[_Choice | None, Any]]:
        """(choice, event) as the engine produces them; first (None, "echo") once the prompts'
        log-probabilities are known, when they are asked for."""
        assert self.ticket is not None
        ticket = self.ticket
        queue: asyncio.Queue[Any] = asyncio.Queue()
        aloop = self._aloop = asyncio.get_running_loop()
        self._queue = queue

        def post(item: Any) -> None:
            aloop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            if self.req.echo and self.req.logprobs is not None:
                self.loop.call(ticket, "echo", self._score_prompts, post)
                self.echo_logprobs = _result(await _next(queue))
                yield None, "echo"
            if self.req.score_only:
                return
            want_lp = self.req.logprobs is not None or self.req.best_of > self.req.n
            self.loop.generate(ticket, self._requests(), post, logprobs=want_lp, top=self.req.logprobs or 0)
            left = set(self.choices)
            while left:
                event = await _next(queue)
                for key, item in self._keyed(event):
                    if not isinstance(item, Token):
                        left.discard(key)
                    self._first_token()
                    yield self.choices[key], item
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        finally:
            self.close()

    @staticmethod
    def _keyed(event: Any) -> list[tuple[tuple[int, int], Any]]:
        """(choice key, event) pairs of an engine event; APIError for a request that failed."""
        if isinstance(event, Done):  # a static request (beam search): all its sequences at once
            p = cast(tuple[int, int], event.key)[1]
            return [((p, c.index), c) for c in _result(event)]
        if isinstance(event, Failed):
            raise APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}", code="engine_error")
        return [((event.key[1], event.key[2]), event)]

    def _score_prompts(self, ticket: Ticket) -> list[list[Any]]:
        from aigc_cli.engine.scoring import prompt_logprobs

        out = []
        for ids in self.prompt_ids:
            if ticket.stopped():
                raise Cancelled("the client went away")
            out.append(prompt_logprobs(self.engine.lm.model, ids, self.req.logprobs or 0))
        return out

    def _first_token(self) -> None:
        if self.state.metrics is not None and "ttft" not in self.log_usage:
            self.log_usage["ttft"] = time.monotonic() - self.arrived
            self.state.metrics.ttft.observe(self.log_usage["ttft"])

    # -- bodies -----------------------------------------------------------------------------

    def _usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        completion_tokens = sum(len(c.tokens) for c in self.choices.values())
        self.log_usage.update(prompt=prompt_tokens, completion=completion_tokens)
        return usage(prompt_tokens, completion_tokens)

    def _number(self, choice: _Choice) -> int:
        return choice.prompt * self.req.n + choice.index

    def _token_text(self, token: int) -> str:
        """How a token is shown in `tokens` and `top_logprobs`: its text, or its name for a special
        token that has none in a WordPiece text ([CLS], [SEP])."""
        if token not in self._texts:
            tok = self.engine.tokenizer
            text = tok.decode([token], clean_up_tokenization_spaces=False)
            self._texts[token] = text if text or not getattr(tok, "wordpiece", False) else str(tok.convert_ids_to_tokens(token))
        return self._texts[token]

    def _shown(self, ids: list[int], before: int | None) -> tuple[list[str], list[int]] | None:
        """(the tokens as shown, the characters each adds to the text) for a WordPiece vocabulary,
        where a token alone does not carry its leading space; None for byte-level BPE (each token's
        text is what it adds)."""
        tok: Any = self.engine.tokenizer  # aigc's FastTokenizer (a transformers tokenizer has no WordPiece flag)
        if not getattr(tok, "wordpiece", False):
            return None
        pieces = tok.pieces(ids, before)
        return [p or self._token_text(t) for p, t in zip(pieces, ids)], [len(p) for p in pieces]

    def _before(self, p: int) -> int | None:
        """The token a completion of prompt `p` goes on from (None after trailing whitespace)."""
        ids = self.prompt_ids[p]
        return ids[-1] if ids and joins(self.prompt_texts[p]) else None

    def _echo_shown(self, p: int) -> tuple[list[str], list[int]] | None:
        """The echoed prompt's tokens as typed (an [UNK] shows the character the user typed) after
        the model's prefix ([CLS], shown by name, taking no characters): WordPiece only."""
        ids, prompt = self.prompt_ids[p], self.req.prompts[p]
        tok: Any = self.engine.tokenizer
        typed = tok.typed_pieces(prompt) if isinstance(prompt, str) and getattr(tok, "wordpiece", False) else None
        n = len(self.engine.prefix)
        if typed is None or len(typed) != len(ids) - n:
            return self._shown(ids, None)
        return [self._token_text(t) for t in ids[:n]] + typed, [0] * n + [len(t) for t in typed]

    def _top(
        self, alternatives: Alternatives | None, chosen: int, logprob: float | None, shown: str, before: int | None
    ) -> dict[str, float] | None:
        """The top_logprobs entry of one position: the k most likely tokens and the chosen one, each
        keyed as `tokens` would show it there (the chosen one exactly as shown; for a WordPiece
        vocabulary what the token would add after `before`, its leading space or ## join included)."""
        if alternatives is None or self.req.logprobs is None:
            return None
        tok: Any = self.engine.tokenizer
        wordpiece = getattr(tok, "wordpiece", False)

        def key(token: int) -> str:
            if token == chosen:
                return shown
            return (tok.pieces([token], before)[0] or self._token_text(token)) if wordpiece else self._token_text(token)

        out: dict[str, float] = {}
        for token, lp in alternatives:
            out.setdefault(key(token), lp)
        if logprob is not None:
            out.setdefault(shown, logprob)
        return out

    def _generated(self, choice: _Choice, start: int, end: int) -> tuple[list[str], list[int], list[float | None], list[Any]]:
        """Tokens, log-probabilities and top entries of the generated tokens start..end-1 (the end
        token is the one after the last generated one)."""
        ids, chosen, alts = [], [], []
        for k in range(start, end):
            if k < len(choice.token_ids):
                token, lp, top = choice.token_ids[k], _at(choice.logprobs, k), _at(choice.top, k)
            else:
                assert choice.end is not None
                token, lp, top = choice.end
            ids.append(token)
            chosen.append(lp)
            alts.append(top)
        before = choice.token_ids[start - 1] if 0 < start <= len(choice.token_ids) else self._before(choice.prompt)
        shown = self._shown(ids, before)
        tokens, widths = shown if shown is not None else ([self._token_text(t) for t in ids], [len(self._token_text(t)) for t in ids])
        befores = [before, *ids[:-1]]
        tops = [self._top(a, t, lp, s, b) for a, t, lp, s, b in zip(alts, ids, chosen, tokens, befores)]
        return tokens, widths, chosen, tops

    def _echoed(self, choice: _Choice) -> tuple[list[str], list[int], list[float | None], list[Any]]:
        ids = self.prompt_ids[choice.prompt]
        shown = self._echo_shown(choice.prompt)
        tokens, widths = shown if shown is not None else ([self._token_text(t) for t in ids], [len(self._token_text(t)) for t in ids])
        chosen, tops = [], []
        for k, (token, entry) in enumerate(zip(ids, self.echo_logprobs[choice.prompt])):
            chosen.append(entry[0] if entry else None)
            tops.append(self._top(entry[1], token, entry[0], tokens[k], ids[k - 1] if k else None) if entry else None)
        return tokens, widths, chosen, tops

    def _logprobs(self, choice: _Choice, start: int, end: int, echo: bool, offset: int) -> dict[str, Any]:
        tokens, widths, chosen, tops = self._echoed(choice) if echo else ([], [], [], [])
        more = self._generated(choice, start, end)
        return logprobs_body(tokens + more[0], chosen + more[2], tops + more[3], offset, widths + more[1])

    def _choice_body(self, choice: _Choice, number: int) -> dict[str, Any]:
        prefix = self.prompt_texts[choice.prompt] if self.req.echo else ""
        lp = self._logprobs(choice, 0, len(choice.tokens), self.req.echo, 0) if self.req.logprobs is not None else None
        body = {"index": number, "text": prefix + choice.text, "logprobs": lp, **self._ending(choice)}
        if self.req.return_token_ids:
            body["token_ids"] = choice.tokens
        return body

    def _ending(self, choice: _Choice) -> dict[str, Any]:
        """OpenAI's finish_reason, and vLLM's stop_reason: the stop string that ended the text (or
        the stop token's id; None for end-of-text and the length limit)."""
        if self.req.score_only:
            return {"finish_reason": "length", "stop_reason": None}
        if choice.finish is None:
            return {"finish_reason": None, "stop_reason": None}
        stop: str | int | None = None
        if choice.finish == "stop" and choice.end is not None:
            stop = choice.end[0]
        elif choice.finish == "stop" and self.req.settings.stop:
            tok: Any = self.engine.tokenizer
            if getattr(tok, "wordpiece", False):  # the text as generated: with its space after a Latin word
                full = "".join(tok.pieces(choice.token_ids, self._before(choice.prompt)))
            else:
                full = tok.decode(choice.token_ids, clean_up_tokenization_spaces=False)
            at = find_stop(full, self.req.settings.stop)
            stop = next((s for s in self.req.settings.stop if at is not None and full.startswith(s, at)), None)
        return {"finish_reason": finish_reason(choice.finish), "stop_reason": stop}

    async def collect(self) -> dict[str, Any]:
        async for choice, event in self._events():
            if choice is not None:
                choice.apply(event)
        picked = sorted(self.choices.values(), key=self._number)
        if self.req.best_of > self.req.n:  # the n best of each prompt's best_of, by mean log-probability
            picked = []
            for p in range(len(self.req.prompts)):
                mine = [c for c in self.choices.values() if c.prompt == p]
                mine.sort(key=lambda c: -sum(x or 0.0 for x in c.logprobs) / max(1, len(c.logprobs)))
                picked.extend(mine[: self.req.n])
            bodies = [self._choice_body(c, k) for k, c in enumerate(picked)]
        else:
            bodies = [self._choice_body(c, self._number(c)) for c in picked]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model, "choices": bodies, "usage": self._usage()}

    def _chunk(self, choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model, "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _echo_chunks(self) -> list[str]:
        """Each choice's prompt (with its log-probabilities when asked for), before its tokens."""
        out = []
        for choice in self.choices.values():
            lp = self._logprobs(choice, 0, 0, True, 0) if self.req.logprobs is not None else None
            body = {"index": self._number(choice), "text": self.prompt_texts[choice.prompt], "logprobs": lp, "finish_reason": None}
            out.append(self._chunk([body]))
        return out

    def _delta(self, choice: _Choice) -> dict[str, Any] | None:
        """The chunk of a choice's new text and tokens (None when nothing is final yet): text is
        held back while it could be the start of a stop string or half a character."""
        done = choice.finish is not None
        safe = len(choice.text) if done else stream_safe_length(choice.text, self.req.settings.stop)
        delta = choice.text[choice.sent : safe]
        if not delta and not done:
            return None
        offset = (len(self.prompt_texts[choice.prompt]) if self.req.echo else 0) + choice.sent
        first, last = choice.streamed_tokens, len(choice.tokens) if done else len(choice.token_ids)
        lp = self._logprobs(choice, first, last, False, offset) if self.req.logprobs is not None else None
        choice.sent, choice.streamed_tokens = safe, last
        body = {"index": self._number(choice), "text": delta, "logprobs": lp, **self._ending(choice)}
        if self.req.return_token_ids:
            body["token_ids"] = choice.tokens[first:last]
        return body

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: the echoed prompt, then text as it becomes final, one chunk per
        choice with its finish_reason, an optional usage chunk, then [DONE]. An error after the
        200 went out travels as an error event, and no [DONE] follows it."""
        try:
            if self.req.echo and self.req.logprobs is None:
                for line in self._echo_chunks():
                    yield line
            async for choice, event in self._events():
                if choice is None:  # the prompts' log-probabilities are known
                    for line in self._echo_chunks():
                        yield line
                    continue
                choice.apply(event)
                body = self._delta(choice)
                if body is not None:
                    yield self._chunk([body])
            if self.req.score_only:
                for choice in self.choices.values():
                    yield self._chunk([{"index": self._number(choice), "text": "", "logprobs": None, **self._ending(choice)}])
            usage_body = self._usage()
            if self.req.include_usage:
                yield self._chunk([], usage_body)
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield f"data: {exc.json().decode()}\n\n"
        finally:
            self.close()


async def _next(queue: asyncio.Queue[Any]) -> Any:
    """The next engine event; an APIError put there (the server is shutting down) is raised."""
    item = await queue.get()
    if isinstance(item, APIError):
        raise item
    return item


def _at(values: list[Any], k: int) -> Any:
    return values[k] if k < len(values) else None


def _result(event: Done) -> Any:
    """A call's result; its RecordError (a request that failed alone) as a 500 for this request."""
    if isinstance(event.result, RecordError):
        raise APIError(500, f"generation failed: {event.result.render('api')}", code="engine_error")
    return event.result
