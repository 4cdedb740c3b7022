"""aigc serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine loop.

The HTTP layer never touches tensors: a request becomes rows for `serving.EngineLoop`, and its
events come back through an asyncio queue. The model loads after the socket is bound, so /health
answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_cli.engine.engine import Completion, Engine
from aigc_cli.engine.engine import Request as EngineRequest
from aigc_cli.core.errors import AigcError, ExitCode, RecordError
from aigc_cli.protocol.openai import (
    APIError,
    CompletionRequest,
    bad,
    chat_chunk,
    chat_request,
    chat_response,
    completion_request,
    finish_reason,
    logprobs_body,
    parse_json,
    usage,
)
from aigc_cli.engine.loop import EngineLoop, Failed, QueueFullError, StoppingError
from aigc_cli.core.textrules import stream_safe_length

MAX_BODY = 4 << 20  # bytes of request body
RETRY_AFTER = "1"  # seconds, on 503
SHUTDOWN_GRACE = 10  # seconds SIGTERM waits for requests in flight before cancelling them
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerOptions:
    model: str = "gpt2"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    batch_size: int | None = None  # None: auto, as in `aigc generate`
    metrics: bool = False
    chat_template: str | None = None  # the template's text


@dataclass
class ServerState:
    options: ServerOptions
    log: Callable[[str], None]
    engine: Engine | None = None
    loop: EngineLoop | None = None
    exit_code: int = 0
    server: Any = None  # uvicorn.Server, to stop it when the model cannot load
    serial: Any = field(default_factory=itertools.count)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Any = None

    def load(self) -> None:
        """Load the model and start the engine loop (a background thread while the socket serves /health)."""
        o = self.options
        started = time.monotonic()
        try:
            engine = Engine.load(o.model, device=o.device, dtype=o.dtype, quantize=o.quantize)
            loop = EngineLoop(engine, o.batch_size, o.max_queue)
            _warm_up(engine)
            loop.start()
        except AigcError as exc:
            self.log(f"aigc serve: error: {exc.message}")
            self._quit(int(exc.exit_code))
            return
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            self.log(f"aigc serve: error: {type(exc).__name__}: {exc}")
            self._quit(int(ExitCode.FAILURE))
            return
        self.engine, self.loop = engine, loop
        precision = engine.lm.dtype if engine.lm.quantize == "none" else f"--quantize {engine.lm.quantize}"
        self.log(f"aigc serve: {o.model} ready in {time.monotonic() - started:.1f} s ({engine.lm.device}, {precision})")

    def _quit(self, code: int) -> None:
        self.exit_code = code
        if self.server is not None:
            self.server.should_exit = True


def _warm_up(engine: Engine) -> None:
    """One short generation, so that the first request does not pay for the kernels' first run."""
    from aigc_cli.core.settings import Decoding, GenerationSettings

    settings = GenerationSettings(max_new_tokens=2, decoding=Decoding.greedy).resolved()
    ids = engine.encode("Hello", settings)
    list(engine.generate([EngineRequest(id=0, prompt="Hello", settings=settings, seed=0, prompt_ids=tuple(ids))]))


# -- the app ------------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="aigc-load", daemon=True).start()
        yield
        if state.loop is not None:
            await asyncio.to_thread(state.loop.stop, SHUTDOWN_GRACE)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    state.metrics = _Metrics(state) if state.options.metrics else None
    app.add_middleware(_AccessLog, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, f"{message}: {request.method} {request.url.path}").body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad(f"invalid request: {exc.errors()[0].get('msg', '')}").body(), status_code=400)

    @app.get("/health")
    async def health() -> Response:
        if state.loop is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            raise APIError(404, "metrics are off: start the server with --metrics")
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        engine = _ready(state, request)
        return JSONResponse({"object": "list", "data": [_model_card(state, engine)]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        engine = _ready(state, request)
        body = parse_json(await _read_body(request))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string", "prompt")
        if "model" in body:
            _check_model(state, body["model"])
        ids = await asyncio.to_thread(engine.tokenizer.encode, prompt, add_special_tokens=False)  # the streams go on meanwhile
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.context_length})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine = _ready(state, request)
        req = completion_request(parse_json(await _read_body(request)))
        _check_model(state, req.model)
        job = _CompletionJob(state, engine, req, request.scope.setdefault("aigc_usage", {}))
        if req.stream:
            return StreamingResponse(job.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _unless_disconnected(request, job.collect()))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        engine = _ready(state, request)
        if state.options.chat_template is None:
            raise bad(
                "GPT-2 has no chat format: send the text to continue to /v1/completions, "
                "or start the server with --chat-template FILE",
                None,
                "chat_not_supported",
            )
        body = chat_request(parse_json(await _read_body(request)), state.options.chat_template, engine.tokenizer)
        req = completion_request(body)
        _check_model(state, req.model)
        job = _CompletionJob(state, engine, req, request.scope.setdefault("aigc_usage", {}))
        if req.stream:
            return StreamingResponse(_chat_chunks(job.sse()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(chat_response(await _unless_disconnected(request, job.collect())))

    return app


async def _chat_chunks(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The completion stream reshaped into chat.completion.chunk events (role first, then content deltas)."""
    opened: set[int] = set()
    async for line in lines:
        payload = line[len("data: ") :].strip()
        if payload == "[DONE]" or payload.startswith('{"error"'):
            yield line
            continue
        event = json.loads(payload)
        for chunk in chat_chunk(event, opened):
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def _model_card(state: ServerState, engine: Engine) -> dict[str, Any]:
    return {
        "id": state.options.model,
        "object": "model",
        "created": state.created,
        "owned_by": "aigc",
        "max_model_len": engine.context_length,
        "revision": engine.lm.revision,
    }


def _ready(state: ServerState, request: Request) -> Engine:
    """The key check, then the engine (503 while it loads)."""
    key = state.options.api_key
    if key is not None:
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
    if state.engine is None or state.loop is None:
        raise APIError(503, "the model is still loading", code="loading")
    return state.engine


def _check_model(state: ServerState, name: Any) -> None:
    if name != state.options.model:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.options.model}'", "model", "model_not_found")


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so its rows) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client went away")


# -- one /v1/completions request -----------------------------------------------------------------


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


class _CompletionJob:
    """Checks the prompts at once (400 before anything streams), then runs the rows and builds the
    response body or the stream of chunks."""

    def __init__(self, state: ServerState, engine: Engine, req: CompletionRequest, log_usage: dict[str, Any]) -> None:
        assert state.loop is not None
        self.state, self.engine, self.loop, self.req = state, engine, state.loop, req
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.arrived = time.monotonic()
        self.log_usage = log_usage
        self.serial = next(state.serial)
        self.seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        tok = engine.tokenizer
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str] = []
        for p, prompt in enumerate(req.prompts):
            if isinstance(prompt, str):
                try:  # before tokenizing, which holds up every stream of the server while it runs
                    engine.check_characters(prompt)
                except RecordError as exc:
                    raise bad(f"{self._where(p)}{exc.message}", "prompt", "context_length_exceeded") from None
            ids = tok.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
            self._check(p, ids, prompt)
            self.prompt_ids.append(ids)
            self.prompt_texts.append(prompt if isinstance(prompt, str) else tok.decode(ids, clean_up_tokenization_spaces=False))
        wanted = req.indices if req.indices is not None else range(req.best_of)
        self.choices = {(p, i): _Choice(p, i) for p in range(len(req.prompts)) for i in wanted}
        self.echo_logprobs: list[list[Any]] = []

    def _where(self, p: int) -> str:
        """How messages name prompt p: only when the request has more than one."""
        return f"prompt {p}: " if len(self.req.prompts) > 1 else ""

    def _check(self, p: int, ids: list[int], prompt: str | list[int]) -> None:
        where = self._where(p)
        if isinstance(prompt, str) and (prompt == "" or prompt.isspace()) or not ids:
            raise bad(f"{where}the prompt is empty", "prompt", "empty_prompt")
        wanted = 0 if self.req.score_only else self.req.settings.max_new_tokens
        context = self.engine.context_length
        if len(ids) + wanted > context:
            raise bad(
                f"{where}this model's context is {context} tokens, and {len(ids) + wanted} were asked for: "
                f"{len(ids)} in the prompt and {wanted} to generate (max_tokens)",
                "prompt" if wanted == 0 or len(ids) > context else "max_tokens",
                "context_length_exceeded",
            )
        try:
            self.engine.check_ids(ids, self.req.settings)
        except RecordError as exc:
            param = {"bad_token": "prompt", "too_big": self.req.settings.mode.kv_rows}.get(exc.code, "prompt")
            raise bad(f"{where}{exc.message}", param, exc.code) from None

    # -- running ----------------------------------------------------------------------------

    async def _events(self) -> AsyncIterator[tuple[_Choice, Any]]:
        """(choice, event) as the engine produces them; the prompt's logprobs first when echoed."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        aloop = asyncio.get_running_loop()

        def post(item: Any) -> None:
            aloop.call_soon_threadsafe(queue.put_nowait, item)

        if self.req.echo and self.req.logprobs is not None:
            self.echo_logprobs = await self._on_engine(queue, post, self._score_prompts)
        if self.req.score_only:
            return
        settings = self.req.settings
        if settings.mode.runs_on != "scheduler":
            results = await self._on_engine(queue, post, self._static)
            self._first_token()
            for c in results:
                yield self.choices[(c.id, c.index)], c
            return
        from aigc_cli.engine.decoding import row_seed
        from aigc_cli.engine.scheduler import RowSpec

        record = self.req.record_id
        specs = [
            RowSpec(
                (self.serial, p, i),
                self.prompt_ids[p],
                settings,
                row_seed(self.seed, record if record is not None else p, i),
                logprobs=self.req.logprobs is not None or self.req.best_of > self.req.n,
                top_logprobs=self.req.logprobs or 0,
            )
            for (p, i) in self.choices
        ]
        try:
            self.loop.submit(specs, post)
        except QueueFullError as exc:
            raise APIError(503, f"the server is busy: {exc}", code="queue_full") from None
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        left = set(self.choices)
        try:
            while left:
                event = await queue.get()
                if isinstance(event, Failed):
                    raise APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}", code="engine_error")
                key = (event.key[1], event.key[2])
                if not hasattr(event, "token"):
                    left.discard(key)
                self._first_token()
                yield self.choices[key], event
        finally:
            if left:  # the client went away, or something failed: free the slots
                self.loop.cancel([(self.serial, p, i) for p, i in left])

    async def _on_engine(self, queue: asyncio.Queue[Any], post: Callable[[Any], None], fn: Callable[[], Any]) -> Any:
        try:
            self.loop.call(fn, lambda result, error: post(("done", result, error)))
        except StoppingError as exc:
            raise APIError(503, str(exc), code="shutting_down") from None
        _, result, error = await queue.get()
        if error is not None:
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", code="engine_error")
        return result

    def _static(self) -> list[Completion]:
        """Beam search, on the engine thread."""
        requests = [
            EngineRequest(
                id=p,
                prompt=self.prompt_texts[p],
                settings=self.req.settings,
                seed=self.seed,
                indices=tuple(i for (q, i) in self.choices if q == p),
                prompt_ids=tuple(ids),
            )
            for p, ids in enumerate(self.prompt_ids)
        ]
        return list(self.engine.generate(requests, batch_size=1, logprobs=self.req.logprobs is not None))

    def _score_prompts(self) -> list[list[Any]]:
        from aigc_cli.engine.scoring import prompt_logprobs

        return [prompt_logprobs(self.engine.lm.model, ids, self.req.logprobs or 0) for ids in self.prompt_ids]

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


class _AccessLog:
    """One line per request on stderr once its response is complete: status, tokens, latency."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            used = scope.get("aigc_usage") or {}
            tokens = f" prompt_tokens={used['prompt']} completion_tokens={used['completion']}" if "prompt" in used else ""
            client = scope.get("client") or ("-", 0)
            code = status[0] or 499  # nothing was sent: the client went away
            self.state.log(
                f'{client[0]} "{scope["method"]} {scope["path"]}" {code}{tokens} {time.monotonic() - started:.3f}s'
            )
            if self.state.metrics is not None:
                self.state.metrics.requests.labels(str(code)).inc()


class _Metrics:
    """Prometheus text: requests by status, running and waiting sequences, tokens, time to first token."""

    def __init__(self, state: ServerState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("aigc_requests", "HTTP requests by status", ["status"], registry=self.registry)
        self.ttft = Histogram(
            "aigc_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        class _Engine:
            def collect(self) -> Any:
                loop = state.loop
                running = GaugeMetricFamily("aigc_sequences_running", "Sequences decoding now")
                waiting = GaugeMetricFamily("aigc_sequences_waiting", "Sequences queued for a slot")
                generated = CounterMetricFamily("aigc_generated_tokens", "Tokens generated")
                prompt = CounterMetricFamily("aigc_prompt_tokens", "Prompt tokens prefilled")
                running.add_metric([], loop.running if loop else 0)
                waiting.add_metric([], loop.waiting if loop else 0)
                generated.add_metric([], loop.stats.generated_tokens if loop else 0)
                prompt.add_metric([], loop.stats.prompt_tokens if loop else 0)
                return [running, waiting, generated, prompt]

        self.registry.register(_Engine())

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


# -- running it ----------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a port in use fails in a second)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        from aigc_cli.core.errors import UsageError

        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def serve(options: ServerOptions, log: Callable[[str], None]) -> int:
    """Serve until SIGTERM or Ctrl-C; returns the exit code (3 when the model cannot load)."""
    import uvicorn

    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    state = ServerState(options, log)
    if options.host not in LOOPBACK and options.api_key is None:
        log(f"aigc serve: warning: listening on {options.host} without an API key: anyone who can reach it can use it (--api-key)")
    config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    server = uvicorn.Server(config)
    state.server = server
    shown = f"[{host}]" if ":" in host else host
    log(f"aigc serve: listening on http://{shown}:{port} (OpenAI API under /v1); loading {options.model}...")
    # uvicorn re-raises the signal it caught once it has shut down; a handler that does nothing
    # lets SIGTERM end the process with 0 after the graceful shutdown.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stderr.flush()
    return state.exit_code
