"""The HTTP routes: health, models, tokenize, completions and chat; keys, body limits, disconnects."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_cli.engine.engine import Engine
from aigc_cli.frontends.server.completions import CompletionJob
from aigc_cli.frontends.server.observability import AccessLog, Metrics
from aigc_cli.frontends.server.state import (
    MAX_BODY,
    RETRY_AFTER,
    SHUTDOWN_GRACE,
    ServerState,
)
from aigc_cli.protocol.chat import chat_chunk, chat_request, chat_response
from aigc_cli.protocol.completions import completion_request
from aigc_cli.protocol.errors import APIError, bad, parse_json


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="aigc-load", daemon=True).start()
        yield
        if state.loop is not None:
            await asyncio.to_thread(state.loop.stop, SHUTDOWN_GRACE)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    state.metrics = Metrics(state) if state.options.metrics else None
    app.add_middleware(AccessLog, state=state)

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
        job = await _started(request, CompletionJob(state, engine, req, request.scope.setdefault("aigc_usage", {})))
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
        job = await _started(request, CompletionJob(state, engine, req, request.scope.setdefault("aigc_usage", {})))
        if req.stream:
            return StreamingResponse(_chat_chunks(job.sse()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(chat_response(await _unless_disconnected(request, job.collect())))

    return app


async def _started(request: Request, job: CompletionJob) -> CompletionJob:
    """The job with its claim on the engine; the claim is freed once the response is over, however
    it ends (the access log's middleware runs the request's clean-ups)."""
    await job.start()
    request.scope.setdefault("aigc_cleanup", []).append(job.close)
    return job


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
        "id": state.options.spec.name,
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
    if name != state.options.spec.name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.options.spec.name}'", "model", "model_not_found")


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
