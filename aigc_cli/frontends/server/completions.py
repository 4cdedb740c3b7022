"""One /v1/completions request: its cost claimed and its prompts checked, its work run through the
engine loop (the same rows and seeds as `aigc generate`), its response or stream of chunks built."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from aigc_cli.core.errors import RecordError
from aigc_cli.core.textrules import stream_safe_length
from aigc_cli.engine.engine import Engine
from aigc_cli.engine.requests import Completion
from aigc_cli.engine.requests import Request as EngineRequest
from aigc_cli.engine.loop import Done, Failed, QueueFullError, StoppingError, Ticket, TooBigError
from aigc_cli.engine.requests import Cancelled
from aigc_cli.engine.scheduler import Token
from aigc_cli.engine.seeds import run_seed
from aigc_cli.frontends.server.state import ServerState
from aigc_cli.protocol.completions import BY_PARAM_NAME, CompletionRequest, finish_reason, logprobs_body, usage
from aigc_cli.protocol.errors import APIError, bad


@dataclass
class _Choice:
    prompt: int
    index: int  # sequence number within its prompt
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    streamed_tokens: int = 0  # tokens whose logprobs were streamed


class CompletionJob:
    """One request: its cost claimed on the engine loop before anything is built (503 when the
    server is full), its prompts tokenized and checked off the event loop (400 before anything
    streams), then its rows run on the engine and its response body or stream of chunks built."""

    def __init__(self, state: ServerState, engine: Engine, req: CompletionRequest, log_usage: dict[str, Any]) -> None:
        assert state.loop is not None
        self.state, self.engine, self.loop, self.req = state, engine, state.loop, req
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.arrived = time.monotonic()
        self.log_usage = log_usage
        self.seed = run_seed(req.seed)
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str] = []
        wanted = req.indices if req.indices is not None else range(req.best_of)
        self.choices = {(p, i): _Choice(p, i) for p in range(len(req.prompts)) for i in wanted}
        self.echo_logprobs: list[list[Any]] = []
        self.ticket: Ticket | None = None

    @property
    def cost(self) -> int:
        """What the request claims of the engine: its sequences (each beam or contrastive branch
        counted), and one per prompt whose log-probabilities are scored."""
        per_prompt = 0 if self.req.score_only else len(self.choices) // max(1, len(self.req.prompts)) * self.req.settings.kv_rows()
        scored = 1 if self.req.echo and self.req.logprobs is not None else 0
        return len(self.req.prompts) * (per_prompt + scored)

    async def start(self) -> None:
        """Claim the engine (503 or 400 when it cannot take this), then tokenize and check the
        prompts in a worker thread, so that the streams in flight go on meanwhile."""
        try:
            self.ticket = self.loop.admit(self.cost)
        except QueueFullError as exc:
            raise APIError(503, f"the server is busy: {exc}", code="queue_full") from None
        except TooBigError as exc:
            raise bad(f"{exc}", "n", "too_many_sequences") from None
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        try:
            await asyncio.to_thread(self._prepare)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """The request is over (or its client left): its work stops, its claim is freed."""
        if self.ticket is not None:
            self.loop.release(self.ticket)

    def _prepare(self) -> None:
        tok = self.engine.tokenizer
        for p, prompt in enumerate(self.req.prompts):
            where = f"prompt {p}: " if len(self.req.prompts) > 1 else ""
            try:
                ids = self.engine.encode(prompt, self.req.settings) if isinstance(prompt, str) else list(prompt)
                self.engine.check_ids(ids, self.req.settings, self.req.generated_tokens)
            except RecordError as exc:
                raise _refusal(exc, where, self.req) from None
            self.prompt_ids.append(ids)
            self.prompt_texts.append(prompt if isinstance(prompt, str) else tok.decode(ids, clean_up_tokenization_spaces=False))

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

    async def _events(self) -> AsyncIterator[tuple[_Choice, Any]]:
        """(choice, event) as the engine produces them; the prompt's logprobs first when echoed."""
        assert self.ticket is not None
        ticket = self.ticket
        queue: asyncio.Queue[Any] = asyncio.Queue()
        aloop = asyncio.get_running_loop()

        def post(item: Any) -> None:
            aloop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            if self.req.echo and self.req.logprobs is not None:
                self.loop.call(ticket, "echo", self._score_prompts, post)
                self.echo_logprobs = _result(await queue.get())
            if self.req.score_only:
                return
            want_lp = self.req.logprobs is not None or self.req.best_of > self.req.n
            self.loop.generate(ticket, self._requests(), post, logprobs=want_lp, top=self.req.logprobs or 0)
            left = set(self.choices)
            while left:
                event = await queue.get()
                if isinstance(event, Done):  # a static request (beam search): all its sequences at once
                    p = cast(tuple[int, int], event.key)[1]
                    for c in _result(event):
                        left.discard((p, c.index))
                        self._first_token()
                        yield self.choices[(p, c.index)], c
                    continue
                if isinstance(event, Failed):
                    raise APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}", code="engine_error")
                key = (event.key[1], event.key[2])
                if not isinstance(event, Token):
                    left.discard(key)
                self._first_token()
                yield self.choices[key], event
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        finally:
            self.close()

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

    @staticmethod
    def _apply(choice: _Choice, event: Any) -> None:
        if isinstance(event, Completion):  # static modes: the whole sequence at once
            choice.text, choice.finish, choice.token_ids = event.text, event.finish_reason, list(event.token_ids)
            choice.logprobs = list(event.logprobs or [])
            return
        if hasattr(event, "token"):  # Token
            choice.text = event.text
            choice.token_ids.append(event.token)
            if event.logprob is not None:
                choice.logprobs.append(event.logprob)
            if event.top is not None:
                choice.top.append(event.top)
            return
        result = event.result  # Finished
        choice.text, choice.finish = result.text, result.finish_reason

    # -- bodies -----------------------------------------------------------------------------

    def _usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        completion_tokens = sum(len(c.token_ids) for c in self.choices.values())
        self.log_usage.update(prompt=prompt_tokens, completion=completion_tokens)
        return usage(prompt_tokens, completion_tokens)

    def _number(self, choice: _Choice) -> int:
        return choice.prompt * self.req.n + choice.index

    def _token_text(self, token: int) -> str:
        return self.engine.tokenizer.decode([token], clean_up_tokenization_spaces=False)

    def _top(self, alternatives: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, lp in alternatives:
            out.setdefault(self._token_text(token), lp)
        return out

    def _logprobs(self, choice: _Choice, start: int, end: int, echo: bool, offset: int) -> dict[str, Any]:
        tokens, chosen, tops = [], [], []
        if echo:
            for token, entry in zip(self.prompt_ids[choice.prompt], self.echo_logprobs[choice.prompt]):
                tokens.append(self._token_text(token))
                chosen.append(entry[0] if entry else None)
                tops.append(self._top(entry[1]) if entry and self.req.logprobs else None)
        for k in range(start, end):
            tokens.append(self._token_text(choice.token_ids[k]))
            chosen.append(choice.logprobs[k] if k < len(choice.logprobs) else None)
            tops.append(self._top(choice.top[k]) if k < len(choice.top) and self.req.logprobs else None)
        return logprobs_body(tokens, chosen, tops, offset)

    def _choice_body(self, choice: _Choice, number: int) -> dict[str, Any]:
        prefix = self.prompt_texts[choice.prompt] if self.req.echo else ""
        lp = self._logprobs(choice, 0, len(choice.token_ids), self.req.echo, 0) if self.req.logprobs is not None else None
        body = {"index": number, "text": prefix + choice.text, "logprobs": lp, **self._ending(choice)}
        if self.req.return_token_ids:
            body["token_ids"] = choice.token_ids
        return body

    def _ending(self, choice: _Choice) -> dict[str, Any]:
        """OpenAI's finish_reason, and vLLM's stop_reason: the stop string that ended the text
        (None for EOS, a stop token or the length limit)."""
        if choice.finish is None:
            return {"finish_reason": None, "stop_reason": None}
        stop = None
        if choice.finish == "stop" and self.req.settings.stop:
            full = self.engine.tokenizer.decode(choice.token_ids, clean_up_tokenization_spaces=False)
            hits = [(full.find(s), k) for k, s in enumerate(self.req.settings.stop) if s in full]
            stop = self.req.settings.stop[min(hits)[1]] if hits else None
        return {"finish_reason": finish_reason(choice.finish), "stop_reason": stop}

    async def collect(self) -> dict[str, Any]:
        async for choice, event in self._events():
            self._apply(choice, event)
        picked = sorted(self.choices.values(), key=self._number)
        if self.req.best_of > self.req.n:  # the n best of each prompt's best_of, by mean log-probability
            picked = []
            for p in range(len(self.req.prompts)):
                mine = [c for c in self.choices.values() if c.prompt == p]
                mine.sort(key=lambda c: -sum(c.logprobs) / max(1, len(c.logprobs)))
                picked.extend(mine[: self.req.n])
            bodies = [self._choice_body(c, k) for k, c in enumerate(picked)]
        else:
            bodies = [self._choice_body(c, self._number(c)) for c in picked]
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.req.model,
            "choices": bodies,
            "usage": self._usage(),
        }

    def _chunk(self, choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model, "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: text as it becomes final (never half a stop string), one chunk per
        choice with its finish_reason, an optional usage chunk, then [DONE]."""
        stops = self.req.settings.stop
        want_lp = self.req.logprobs is not None
        started: set[tuple[int, int]] = set()
        try:
            if self.req.echo:
                for key, choice in self.choices.items():
                    started.add(key)
                    lp = self._logprobs(choice, 0, 0, True, 0) if want_lp else None
                    yield self._chunk([{"index": self._number(choice), "text": self.prompt_texts[choice.prompt], "logprobs": lp, "finish_reason": None}])
            async for choice, event in self._events():
                self._apply(choice, event)
                done = choice.finish is not None
                safe = len(choice.text) if done else stream_safe_length(choice.text, stops)
                delta = choice.text[choice.sent : safe]
                if not delta and not done:
                    continue
                offset = (len(self.prompt_texts[choice.prompt]) if self.req.echo else 0) + choice.sent
                first, last = choice.streamed_tokens, len(choice.token_ids)
                lp = self._logprobs(choice, first, last, False, offset) if want_lp else None
                choice.sent, choice.streamed_tokens = safe, last
                body = {"index": self._number(choice), "text": delta, "logprobs": lp, **self._ending(choice)}
                if self.req.return_token_ids:
                    body["token_ids"] = choice.token_ids[first:last]
                yield self._chunk([body])
            if self.req.score_only:
                for choice in self.choices.values():
                    yield self._chunk([{"index": self._number(choice), "text": "", "logprobs": None, "finish_reason": "length"}])
            if self.req.include_usage:
                yield self._chunk([], self._usage())
            else:
                self._usage()
            yield "data: [DONE]\n\n"
        except APIError as exc:  # after the 200 went out: the error travels as an event
            yield f"data: {json.dumps(exc.body())}\n\n"


# -- access log and metrics ----------------------------------------------------------------------


def _result(event: Done) -> Any:
    """A call's result; its RecordError (a request that failed alone) as a 500 for this request."""
    if isinstance(event.result, RecordError):
        raise APIError(500, f"generation failed: {event.result.render('api')}", code="engine_error")
    return event.result


def _refusal(exc: RecordError, where: str, req: CompletionRequest) -> APIError:
    """A prompt the engine cannot take, as a 400 naming the request field at fault."""
    if exc.code == "prompt_too_long":
        param = "prompt" if req.generated_tokens == 0 or "characters" in exc.text else "max_tokens"
        return bad(f"{where}{exc.render('api')}", param, "context_length_exceeded")
    field = (req.settings.mode.kv_rows if exc.code == "too_big" else exc.field) or "prompt"
    param = BY_PARAM_NAME.get(field, field)
    return bad(f"{where}{exc.render('api')}", param, exc.code)
