"""The HTTP routes: health, models, metrics, the tokenizer (vLLM's /tokenize, /detokenize,
/tokenizer_info), completions and chat; the API key, body limits, disconnects, and every error in
OpenAI's shape (a client's mistake is a 4xx naming the field, never a 500)."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aigc_cli.engine.engine import Engine
from aigc_cli.frontends.server.completions import CompletionJob
from aigc_cli.frontends.server.observability import AccessLog, Metrics
from aigc_cli.frontends.server.prepare import PREPARE_ELSEWHERE
from aigc_cli.frontends.server.state import RETRY_AFTER, ServerState
from aigc_cli.protocol import schema
from aigc_cli.protocol.chat import chat_chunk, chat_error, chat_response
from aigc_cli.protocol.errors import APIError, bad, quoted


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="aigc-load", daemon=True).start()
        yield
        if state.helper is not None:
            state.helper.close()
        if state.loop is not None:
            await asyncio.to_thread(state.loop.stop, 5.0)

    app = FastAPI(lifespan=lifespan, title="aigc", docs_url=None, redoc_url=None)
    state.metrics = Metrics(state) if state.options.metrics else None
    app.add_middleware(AccessLog, state=state)
    _error_handlers(app)
    _service_routes(app, state)
    _tokenizer_routes(app, state)
    _completion_routes(app, state)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, its request bodies built from the settings registry."""
    if app.openapi_schema is None:
        doc = get_openapi(title="aigc", version="1", routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update({k: make() for k, make in schema.COMPONENTS.items()})
        app.openapi_schema = doc
    return app.openapi_schema


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error_response(APIError(exc.status_code, f"{message}: {request.method} {quoted(request.url.path, 200)}"))


def error_response(exc: APIError) -> Response:
    headers = {"Retry-After": RETRY_AFTER} if exc.status == 503 else None
    return Response(exc.json(), status_code=exc.status, media_type="application/json", headers=headers)


def _service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": RETRY_AFTER})
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
        card = {
            "id": state.options.spec.name, "object": "model", "created": state.created, "owned_by": "aigc",
            "max_model_len": engine.context_length, "revision": engine.lm.revision,
        }
        return JSONResponse({"object": "list", "data": [card]})


def _tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize", openapi_extra=schema.body("TokenizeRequest"))
    async def tokenize(request: Request) -> Response:
        _ready(state, request)
        return Response(await _prepare(state, "tokenize", await _read(state, request)), media_type="application/json")

    @app.post("/detokenize", openapi_extra=schema.body("DetokenizeRequest"))
    async def detokenize(request: Request) -> Response:
        _ready(state, request)
        return Response(await _prepare(state, "detokenize", await _read(state, request)), media_type="application/json")

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        engine = _ready(state, request)
        tok = engine.tokenizer
        info: dict[str, Any] = {"tokenizer_class": type(tok).__name__, "vocab_size": len(tok), "model_max_length": engine.context_length}
        for name in ("bos", "eos", "pad", "unk", "sep", "cls"):
            info[f"{name}_token"] = getattr(tok, f"{name}_token", None)
            info[f"{name}_token_id"] = getattr(tok, f"{name}_token_id", None)
        info["prompt_prefix"] = engine.prefix  # aigc: the ids every prompt starts with ([CLS] for a BERT vocabulary)
        return JSONResponse(info)


def _completion_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", openapi_extra=schema.body("CompletionRequest"))
    async def completions(request: Request) -> Response:
        engine = _ready(state, request)
        prepared = await _prepare(state, "completion", await _read(state, request))
        return await _respond(request, CompletionJob(state, engine, prepared, _usage(request)), lambda x: x)

    @app.post("/v1/chat/completions", openapi_extra=schema.body("ChatCompletionRequest"))
    async def chat(request: Request) -> Response:
        engine = _ready(state, request)
        if state.options.chat_template is None:
            raise bad(
                "GPT-2 has no chat format: send the text to continue to /v1/completions, or start the server with --chat-template FILE",
                None,
                "chat_not_supported",
            )
        prepared = await _prepare(state, "chat", await _read(state, request))
        try:
            return await _respond(request, CompletionJob(state, engine, prepared, _usage(request)), chat_response, chat=True)
        except APIError as exc:
            raise chat_error(exc, {"max_completion_tokens": prepared.max_completion_tokens}) from None


def _usage(request: Request) -> dict[str, Any]:
    """Where a request's token counts go for the access log."""
    return cast(dict[str, Any], request.scope.setdefault("aigc_usage", {}))


async def _respond(request: Request, job: CompletionJob, shape: Callable[[dict[str, Any]], dict[str, Any]], chat: bool = False) -> Response:
    """Start the job (its claim is freed once the response is over, however it ends: the access
    log's middleware runs the request's clean-ups), then stream it or answer with its body."""
    await job.start()
    request.scope.setdefault("aigc_cleanup", []).append(job.close)
    if job.req.stream:
        lines = _chat_chunks(job.sse()) if chat else job.sse()
        return StreamingResponse(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(shape(await _unless_disconnected(request, job.collect())))


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


def _ready(state: ServerState, request: Request) -> Engine:
    """The key check, then the engine (503 while it loads, or once the server is draining)."""
    key = state.options.api_key
    if key is not None:
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
    if state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if state.engine is None or state.loop is None:
        raise APIError(503, "the model is still loading", code="loading")
    return state.engine


async def _read(state: ServerState, request: Request) -> bytes:
    """The request's body, read up to --max-body bytes (413 past it, before the rest is read)."""
    limit = state.options.max_body
    length = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit:,} bytes (--max-body)", code="body_too_large")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client went away while sending its request") from None
    return b"".join(chunks)


async def _prepare(state: ServerState, kind: str, raw: bytes) -> Any:
    """`Preparer.<kind>(raw)`: a large body in the helper process (see prepare.py), a small one
    in a worker thread of this process."""
    assert state.preparer is not None
    if len(raw) > PREPARE_ELSEWHERE and state.helper is not None:
        return await state.helper.run(kind, raw)
    return await asyncio.to_thread(getattr(state.preparer, kind), raw)


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
