"""`aigc generate --server URL`: the engine's batch interface over a running `aigc serve`.

Standard library only (no torch, no HTTP package), so the CLI starts at once. Requests go out a
few dozen at a time on kept-alive connections and come back in input order; the server's draws
equal the local engine's, so the records equal a local run's.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from aigc_cli.core import jsondata
from aigc_cli.engine.requests import Completion, Request, check_length, prompt_ids
from aigc_cli.core.errors import AigcError, ModelUnavailableError, UsageError
from aigc_cli.protocol.completions import request_body
from aigc_cli.core.settings import GenerationSettings

T = TypeVar("T")
_END: Any = object()
IN_FLIGHT = 32  # requests sent ahead of the one being written
BUSY_WAIT = 120.0  # seconds to keep retrying while the server answers 503 (queue full)
TIMEOUT = 600.0  # seconds without an answer before a request counts as failed


class RemoteEngine:
    """What BatchJob needs of an engine (name, revision, context, encode, stream), served remotely."""

    def __init__(self, url: str, api_key: str | None, name: str, context_length: int, revision: str) -> None:
        self.url, self.api_key = url.rstrip("/"), api_key
        self.name, self.context_length, self.revision = name, context_length, revision
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {url}: not an http:// or https:// URL")
        self._parts = parts
        self._local = threading.local()

    @classmethod
    def connect(cls, url: str, api_key: str | None, model: str | None) -> RemoteEngine:
        """Ask the server which model it serves; `model`, when given, must be that one."""
        probe = cls(url, api_key, "", 0, "")
        cards = probe._call("GET", "/v1/models", None).get("data") or []
        if not cards:
            raise ModelUnavailableError(f"--server {url}: the server lists no model")
        card = cards[0]
        if model is not None and model not in [c.get("id") for c in cards]:
            raise UsageError(f"--model {model}: the server at {url} serves {card.get('id')!r}")
        return cls(url, api_key, str(card["id"]), int(card.get("max_model_len") or 1024), str(card.get("revision") or "unknown"))

    # -- the engine interface -------------------------------------------------------------------

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]:
        ids = prompt_ids(prompt, lambda text: self._call("POST", "/tokenize", {"model": self.name, "prompt": text})["tokens"])
        check_length(len(ids), settings.max_new_tokens, self.context_length)
        return ids

    def stream(
        self,
        items: Iterable[T],
        request_of: Callable[[T], Request | None],
        batch_size: int | None = None,
        on_text: Callable[[Completion, str], None] | None = None,
    ) -> Iterator[tuple[T, list[Completion]]]:
        """Each item with its request's completions, in input order; up to IN_FLIGHT requests at once."""
        ahead: deque[tuple[T, Future[list[Completion]] | None]] = deque()
        source = iter(items)
        with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="aigc-client") as pool:
            more = True
            while more or ahead:
                while more and len(ahead) < IN_FLIGHT:
                    item = next(source, _END)
                    if item is _END:
                        more = False
                        break
                    req = request_of(item)
                    ahead.append((item, pool.submit(self._complete, req, on_text) if req is not None else None))
                item, future = ahead.popleft()
                try:
                    yield item, future.result() if future is not None else []
                except BaseException:
                    for _, f in ahead:
                        if f is not None:
                            f.cancel()
                    raise

    def _complete(self, req: Request, on_text: Callable[[Completion, str], None] | None) -> list[Completion]:
        body = request_body(self.name, req.prompt, req.settings, req.seed, req.id, req.indices, stream=on_text is not None)
        wanted = req.wanted()
        prompt_tokens = len(req.prompt_ids or ())
        if on_text is not None:
            return self._streamed(body, req, wanted, prompt_tokens, on_text)
        reply = self._call("POST", "/v1/completions", body)
        by_index = {c["index"]: c for c in reply["choices"]}
        return [self._completion(req, i, by_index[i], prompt_tokens) for i in wanted]

    def _streamed(
        self, body: dict[str, Any], req: Request, wanted: tuple[int, ...], prompt_tokens: int, on_text: Callable[[Completion, str], None]
    ) -> list[Completion]:
        texts = {i: "" for i in wanted}
        ids: dict[int, list[int]] = {i: [] for i in wanted}
        ends: dict[int, dict[str, Any]] = {}
        for chunk in self._events("/v1/completions", body):
            for c in chunk.get("choices", []):
                i = c["index"]
                texts[i] += c.get("text") or ""
                ids[i].extend(c.get("token_ids") or [])
                if c.get("finish_reason") is not None:
                    ends[i] = c
                partial = Completion(req.id, i, req.prompt, "", "", prompt_tokens, 0, req.seed)
                on_text(partial, texts[i])
        return [
            self._completion(req, i, {**ends.get(i, {}), "text": texts[i], "token_ids": ids[i]}, prompt_tokens) for i in wanted
        ]

    @staticmethod
    def _completion(req: Request, index: int, choice: dict[str, Any], prompt_tokens: int) -> Completion:
        reason = choice.get("finish_reason") or "length"
        if reason == "stop" and choice.get("stop_reason") is None:
            reason = "eos"  # OpenAI's "stop" covers EOS; aigc's records tell them apart
        token_ids = list(choice.get("token_ids") or [])
        return Completion(req.id, index, req.prompt, choice["text"], reason, prompt_tokens, len(token_ids), req.seed, token_ids=token_ids)

    # -- HTTP -----------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            p = self._parts
            kind = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(p.hostname or "", p.port, timeout=TIMEOUT)
        return conn

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        base = self._parts.path.rstrip("/")
        give_up = time.monotonic() + BUSY_WAIT
        for attempt in range(3 + int(BUSY_WAIT)):
            conn = self._connection()
            try:
                conn.request(method, base + path, body=data, headers=headers)
                response = conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt < 2 and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue  # a kept-alive connection the server had closed
                raise ModelUnavailableError(f"--server {self.url}: cannot reach the server ({_reason(exc)})") from None
            if response.status == 503 and time.monotonic() < give_up:
                response.read()
                time.sleep(float(response.getheader("Retry-After") or 1))
                continue
            return response
        raise AigcError(f"--server {self.url}: the server stayed busy for {BUSY_WAIT:.0f} s")

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        response = self._send(method, path, body)
        data = response.read()
        if response.status != 200:
            self._refused(response.status, data)
        try:
            return jsondata.loads(data)
        except ValueError:
            raise AigcError(f"--server {self.url}: {path} answered something that is not JSON") from None

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        response = self._send("POST", path, body)
        if response.status != 200:
            self._refused(response.status, response.read())
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                event = jsondata.loads(payload)
            except ValueError:
                raise AigcError(f"--server {self.url}: {path} streamed an event that is not JSON") from None
            if not isinstance(event, dict):
                raise AigcError(f"--server {self.url}: {path} streamed an event that is not a JSON object")
            if "error" in event:
                raise AigcError(f"--server {self.url}: {event['error'].get('message')}")
            yield event

    def _refused(self, status: int, data: bytes) -> None:
        try:
            message = jsondata.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = data[:200].decode("utf-8", "replace") or f"HTTP {status}"
        if status == 401:
            raise UsageError(f"--api-key: the server at {self.url} refused the key ({message})")
        if status in (400, 404, 413):
            raise UsageError(f"--server {self.url}: {message}")
        if status == 503:
            raise ModelUnavailableError(f"--server {self.url}: {message}")
        raise AigcError(f"--server {self.url}: HTTP {status}: {message}")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
