"""`aigc generate --server URL`: the engine's batch interface over a running `aigc serve`.

Standard library only (no torch, no HTTP package), so the CLI starts at once. Requests go out a
few dozen at a time on kept-alive connections, each one streamed (server-sent events, so the read
timeout measures the server's silence, not the length of a generation), and come back in input
order; the server's draws equal the local engine's, so the records equal a local run's.

The client only writes what the server sent whole: a stream that ends without every sequence's
finish reason and `data: [DONE]`, an error event, a connection that closes or stays silent past
--read-timeout, and any reply that is not the shape the client reads are each a one-line error
naming the server and the endpoint (exit 1); the records before it stay written. A server that
cannot be reached (or not within --connect-timeout) is exit 3, a malformed URL a usage error.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aigc_cli.core import jsondata
from aigc_cli.core.errors import AigcError, ModelUnavailableError, RecordError, UsageError
from aigc_cli.core.settings import GenerationSettings
from aigc_cli.engine.requests import Completion, Request, checked_prompt_ids
from aigc_cli.protocol.completions import request_body

T = TypeVar("T")
_END: Any = object()
IN_FLIGHT = 32  # requests sent ahead of the one being written
BUSY_WAIT = 120.0  # seconds to keep retrying while the server answers 503 (queue full, loading)
# A TCP connect (and TLS handshake) that has not happened in 10 s will not: three SYN retransmissions fit.
CONNECT_TIMEOUT = 10.0
# Each streamed token is news, so a healthy server is silent only while a request waits for a free
# row or runs a beam search (whose text comes at its end): minutes only for long beams on a CPU.
READ_TIMEOUT = 300.0
MAX_TIMEOUT = 86_400.0
MAX_REPLY = 64 << 20  # bytes of one reply body, or of one line of a stream
COMPLETIONS = "/v1/completions"
# The server's codes for a 400 about one prompt or request, as the code of its error record.
RECORD_CODES = {
    "invalid_text": "invalid_text", "empty_prompt": "empty_prompt", "tokenizer_error": "tokenizer_error",
    "prompt_too_long": "prompt_too_long", "context_length_exceeded": "prompt_too_long", "too_long": "prompt_too_long",
    "bad_token": "bad_token", "too_big": "too_big", "too_many_sequences": "too_many_sequences",
}


def server_address(url: str) -> urllib.parse.SplitResult:
    """The parts of a --server URL, checked before anything is opened: an http:// or https:// URL
    of a host, a port from 1 to 65535, no user, query or fragment; a UsageError naming --server."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--server {url}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        hint = f"did you mean http://{url}?" if url and "://" not in url else None
        raise UsageError(f"--server {url}: not an http:// or https:// URL", hint)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise UsageError(f"--server {url!r}: the URL has a space or a control character")
    why = (
        "the URL names no host" if not parts.hostname
        else "port 0 is not a port to connect to" if port == 0
        else "a user or password in the URL is not supported (give the key with --api-key)" if "@" in parts.netloc
        else "a query or fragment in the URL is not supported" if parts.query or parts.fragment or url.endswith(("?", "#"))
        else None
    )
    if why is not None:
        raise UsageError(f"--server {url}: {why}")
    return parts


@dataclass(frozen=True)
class Timeouts:
    """How long the client waits for a connection, and for the server to say anything (seconds)."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT

    @classmethod
    def checked(cls, connect: float | None, read: float | None) -> Timeouts:
        """The timeouts of --connect-timeout and --read-timeout (None: the default), each above 0
        and at most a day; a UsageError naming the flag otherwise."""
        for flag, value in (("--connect-timeout", connect), ("--read-timeout", read)):
            if value is not None and not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
                raise UsageError(f"{flag} must be above 0 and at most {MAX_TIMEOUT:,.0f} seconds (got {value:g})")
        return cls(CONNECT_TIMEOUT if connect is None else connect, READ_TIMEOUT if read is None else read)


class _Server:
    """Kept-alive connections to one server, one per thread, with the client's time limits; every
    failure is a one-line AigcError naming the server and the endpoint. `close` shuts every socket,
    so that threads still waiting on one stop at once."""

    def __init__(self, url: str, parts: urllib.parse.SplitResult, api_key: str | None, timeouts: Timeouts) -> None:
        self.url, self.parts, self.api_key, self.timeouts = url, parts, api_key, timeouts
        self.closed = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    # -- what went wrong, in one line -------------------------------------------------------------

    def unexpected(self, path: str, what: str) -> AigcError:
        """A reply that is not the shape the client reads."""
        return AigcError(f"--server {self.url}: {path}: not the reply of an aigc (OpenAI-compatible) server: {what}")

    def cut(self, path: str, what: str) -> AigcError:
        """A stream that ended before its sequences and data: [DONE]."""
        return AigcError(f"--server {self.url}: {path}: the stream ended early: {what}")

    def silent(self, path: str) -> AigcError:
        """The server said nothing for the read timeout."""
        t = self.timeouts.read
        return AigcError(f"--server {self.url}: {path}: no answer within the read timeout of {t:g} s (--read-timeout)")

    # -- connections ------------------------------------------------------------------------------

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, connected within the connect timeout; True when it is new."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            return conn, False
        if self.closed:
            raise AigcError(f"--server {self.url}: the client was closed")
        self._drop()  # one the server closed after its last reply (Connection: close)
        p = self.parts
        kind = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = self._local.conn = kind(p.hostname or "", p.port, timeout=self.timeouts.connect)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            t = self.timeouts.connect
            raise ModelUnavailableError(f"--server {self.url}: no connection within the connect timeout of {t:g} s (--connect-timeout)") from None
        except OSError as exc:
            conn.close()
            raise ModelUnavailableError(f"--server {self.url}: cannot reach the server ({_reason(exc)})") from None
        sock = self._local.sock = conn.sock
        assert sock is not None
        sock.settimeout(self.timeouts.read)
        with self._lock:
            if not self.closed:  # (close may have run meanwhile)
                self._sockets.add(sock)
                return conn, True
        self._drop()
        raise AigcError(f"--server {self.url}: the client was closed")

    def _drop(self) -> None:
        """Close this thread's connection (after a failure, or a reply it cannot carry on from)."""
        conn, sock = getattr(self._local, "conn", None), getattr(self._local, "sock", None)
        if sock is not None:
            with self._lock:
                self._sockets.discard(sock)
        if conn is not None:
            conn.close()
        self._local.conn = self._local.sock = None

    def close(self) -> None:
        """Shut every connection, also those other threads wait on; no new one opens after this."""
        self.closed = True
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # -- requests ---------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> http.client.HTTPResponse:
        """The response's status and headers; 503 (busy, loading) is retried for BUSY_WAIT seconds."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        target = self.parts.path.rstrip("/") + path
        give_up = time.monotonic() + BUSY_WAIT
        while True:
            conn, new = self._connection()
            try:
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
            except TimeoutError:
                self._drop()
                raise self.silent(path) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if not new and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue  # a kept-alive connection the server had closed meanwhile: once more on a new one
                raise AigcError(f"--server {self.url}: {path}: the connection failed before an answer ({_reason(exc)})") from None
            left = give_up - time.monotonic()
            if response.status != 503 or left <= 0:
                return response
            self._read(response, path)
            time.sleep(min(_retry_after(response.getheader("Retry-After")), left))

    def _receive(self, path: str, read: Callable[[int], bytes], what: str, broken: Callable[[str], AigcError]) -> bytes:
        """What `read(MAX_REPLY + 1)` gets from the connection: silence past the read timeout, a
        failure (`broken(reason)`) and more than MAX_REPLY bytes (`what`) are errors."""
        try:
            data = read(MAX_REPLY + 1)
        except TimeoutError:
            self._drop()
            raise self.silent(path) from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise broken(_reason(exc)) from None
        if len(data) > MAX_REPLY:
            self._drop()
            raise self.unexpected(path, f"{what} is larger than {MAX_REPLY:,} bytes")
        return data

    def _read(self, response: http.client.HTTPResponse, path: str) -> bytes:
        """A reply's whole body."""
        where = f"--server {self.url}: {path}"
        data = self._receive(path, response.read, "its body", lambda why: AigcError(f"{where}: the connection failed in the middle of the reply ({why})"))
        if response.length:  # a Content-Length the connection did not deliver
            self._drop()
            raise AigcError(f"{where}: the connection closed after {len(data):,} bytes of the reply")
        return data

    def call(self, method: str, path: str, body: dict[str, Any] | None, record: bool = False) -> dict[str, Any]:
        """A JSON object from `path`; with `record`, a refusal of the prompt is its RecordError."""
        response = self._send(method, path, body)
        data = self._read(response, path)
        if response.status != 200:
            raise self.refusal(response.status, data, path, record)
        return self._object(path, data, "body")

    def _object(self, path: str, data: bytes, what: str) -> dict[str, Any]:
        """`data` (a reply's body, an event's data) as the JSON object it must be."""
        if not data.strip():
            raise self.unexpected(path, f"an empty {what}")
        try:
            value = jsondata.loads(data)
        except ValueError:
            raise self.unexpected(path, f"a {what} that is not JSON ({_glimpse(data)})") from None
        if not isinstance(value, dict):
            raise self.unexpected(path, f"a {what} that is not a JSON object ({_glimpse(data)})")
        return value

    def refusal(self, status: int, data: bytes, path: str, record: bool) -> AigcError:
        """The error of an answer other than 200, with the server's message (OpenAI's error shape)."""
        error = _error_body(data)
        message = error["message"] if error is not None else _glimpse(data) if data.strip() else "an empty body"
        if record and status in (400, 413):
            refused = _record_refusal(status, error, message)
            if refused is not None:
                return refused
        where = f"--server {self.url}: {path}"
        if status == 401:
            return UsageError(f"--api-key: the server at {self.url} refused the key ({message})")
        if status == 404:
            hint = "give the server's own URL, without /v1" if self.parts.path.rstrip("/").endswith("/v1") else None
            return UsageError(f"{where}: {message}", hint)
        if status in (400, 413):
            return UsageError(f"{where}: the server refused the request: {message}")
        if status == 503:
            return ModelUnavailableError(f"{where}: the server is unavailable ({message})")
        return AigcError(f"{where}: HTTP {status}: {message}")

    # -- server-sent events -----------------------------------------------------------------------

    def events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a stream, up to `data: [DONE]`; an error event, a stream that ends
        before [DONE] and an event that is not a JSON object are errors."""
        response = self._send("POST", path, body)
        if response.status != 200:
            raise self.refusal(response.status, self._read(response, path), path, record=True)
        kind = response.getheader("Content-Type") or ""
        if not kind.startswith("text/event-stream"):
            data = self._read(response, path)
            raise self.unexpected(path, f"{kind or 'no Content-Type'} instead of an event stream ({_glimpse(data) if data.strip() else 'empty'})")
        for payload in self._payloads(response, path):
            if payload == b"[DONE]":
                self._end(response)
                return
            event = self._object(path, payload, "stream event")
            if "error" in event:
                error = _error_body(payload)
                self._drop()
                raise AigcError(f"--server {self.url}: {path}: the server ended the stream with an error: {_error_text(error, payload)}")
            yield event

    def _payloads(self, response: http.client.HTTPResponse, path: str) -> Iterator[bytes]:
        """The data of each event (its `data:` lines joined, as the SSE standard says), dispatched
        at the blank line that ends it; an event the stream ends inside is not one."""
        data: list[bytes] = []
        while True:
            line = self._line(response, path)
            if not line:
                self._drop()
                raise self.cut(path, "the connection closed before data: [DONE]" + (" (in the middle of an event)" if data else ""))
            line = line.rstrip(b"\r\n")
            if not line:
                if data:
                    yield b"\n".join(data)
                data = []
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)

    def _line(self, response: http.client.HTTPResponse, path: str) -> bytes:
        """The stream's next line (b"" at its end)."""
        return self._receive(
            path, response.readline, "a line of its stream", lambda why: self.cut(path, f"the connection failed in the middle of the stream ({why})")
        )

    def _end(self, response: http.client.HTTPResponse) -> None:
        """After data: [DONE], the end of the response, so that the connection can carry the next
        request; a server that sends more or holds the stream open loses the connection instead."""
        conn, sock = self._local.conn, self._local.sock
        try:
            sock.settimeout(min(1.0, self.timeouts.read))
            rest = response.read(1)
            if not rest and response.isclosed() and conn.sock is not None:
                sock.settimeout(self.timeouts.read)
                return
        except (OSError, http.client.HTTPException):
            pass
        self._drop()


@dataclass
class _Sequence:
    """One sequence as its stream builds it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None

    def add(self, choice: dict[str, Any]) -> None:
        self.text += choice["text"]
        self.token_ids.extend(choice["token_ids"])
        if choice.get("finish_reason") is not None:
            self.finish_reason, self.stop_reason = choice["finish_reason"], choice.get("stop_reason")

    def completion(self, req: Request, index: int, prompt_tokens: int) -> Completion | str:
        """Its Completion as the local engine makes it, or why the server's account is not one:
        OpenAI's "stop" covers an end-of-text (no stop_reason), a stop token (its id) and a stop
        string; the server counts an end token among `token_ids`, aigc's records do not."""
        ids, reason = self.token_ids, self.finish_reason or ""
        if reason == "stop" and not isinstance(self.stop_reason, str):
            if not ids or (self.stop_reason is not None and ids[-1] != self.stop_reason):
                return f"sequence {index} ended on a token that is not among its token_ids"
            ids, reason = ids[:-1], "eos" if self.stop_reason is None else "stop"
        return Completion(req.id, index, req.prompt, self.text, reason, prompt_tokens, len(ids), req.seed, token_ids=list(ids))


class RemoteEngine:
    """What BatchJob needs of an engine (name, revision, context, encode, stream), served remotely."""

    def __init__(self, server: _Server, name: str, context_length: int, revision: str) -> None:
        self._server = server
        self.url = server.url
        self.name, self.context_length, self.revision = name, context_length, revision

    @classmethod
    def connect(cls, url: str, api_key: str | None, model: str | None, timeouts: Timeouts = Timeouts()) -> RemoteEngine:
        """Ask the server which model it serves; `model`, when given, must be one of them."""
        server = _Server(url.rstrip("/"), server_address(url), api_key, timeouts)
        name, context, revision = _model_card(server, server.call("GET", "/v1/models", None), model)
        return cls(server, name, context, revision)

    def close(self) -> None:
        """Shut the connections (the pipeline's end)."""
        self._server.close()

    # -- the engine interface -------------------------------------------------------------------

    def encode(self, prompt: str, settings: GenerationSettings) -> list[int]:
        """The prompt's token ids by the server's tokenizer, after the checks a local run makes."""
        return checked_prompt_ids(prompt, self._tokenize, settings, self.context_length)

    def _tokenize(self, text: str) -> list[int]:
        """The server's token ids of a text, as the local engine tokenizes (no special tokens)."""
        body = {"model": self.name, "prompt": text, "add_special_tokens": False}
        tokens: Any = self._server.call("POST", "/tokenize", body, record=True).get("tokens")
        if not _is_ids(tokens):
            raise self._server.unexpected("/tokenize", f"'tokens' is not a list of token ids ({_glimpse(tokens)})")
        return list(tokens)

    def stream(
        self,
        items: Iterable[T],
        request_of: Callable[[T], Request | None],
        batch_size: int | None = None,
        on_text: Callable[[Completion, str], None] | None = None,
    ) -> Iterator[tuple[T, list[Completion] | RecordError]]:
        """Each item with its request's completions (or the RecordError of a request the server
        refused), in input order; up to IN_FLIGHT requests at once. A failure ends it: the requests
        still in flight are dropped, their connections shut."""
        ahead: deque[tuple[T, Future[list[Completion]] | None]] = deque()
        source = iter(items)
        more = True
        pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="aigc-client")
        try:
            while True:
                while more and len(ahead) < IN_FLIGHT:
                    item = next(source, _END)
                    if item is _END:
                        more = False
                        break
                    req = request_of(item)
                    ahead.append((item, pool.submit(self._complete, req, on_text) if req is not None else None))
                if not ahead:
                    return
                item, future = ahead.popleft()
                yield item, _result(future)
        finally:
            if ahead:  # ended by a failure, an interruption or a reader that stopped
                for _, pending in ahead:
                    if pending is not None:
                        pending.cancel()
                self._server.close()
            pool.shutdown(wait=not ahead, cancel_futures=True)

    def _complete(self, req: Request, on_text: Callable[[Completion, str], None] | None) -> list[Completion]:
        """One request's sequences, streamed; only a stream that gives each its finish reason and
        ends with data: [DONE] makes completions."""
        body = request_body(self.name, req.prompt, req.settings, req.seed, req.id, req.indices, stream=True)
        sequences = {i: _Sequence() for i in req.wanted()}
        prompt_tokens = len(req.prompt_ids or ())
        for event in self._server.events(COMPLETIONS, body):
            for choice in _choices(self._server, event, sequences):
                i = choice["index"]
                sequences[i].add(choice)
                if on_text is not None and not self._server.closed:
                    on_text(Completion(req.id, i, req.prompt, "", "", prompt_tokens, 0, req.seed), sequences[i].text)
        unfinished = [i for i, s in sequences.items() if s.finish_reason is None]
        if unfinished:
            raise self._server.cut(COMPLETIONS, f"data: [DONE] came before sequence {unfinished[0]} had its finish reason")
        done = [s.completion(req, i, prompt_tokens) for i, s in sequences.items()]
        bad = next((c for c in done if isinstance(c, str)), None)
        if bad is not None:
            raise self._server.unexpected(COMPLETIONS, bad)
        return [c for c in done if isinstance(c, Completion)]


# -- the shapes of replies ----------------------------------------------------------------------------


def _model_card(server: _Server, reply: dict[str, Any], model: str | None) -> tuple[str, int, str]:
    """(name, context, revision) of the model the server serves (of `model`, when named)."""
    path = "/v1/models"
    cards = reply.get("data")
    if not isinstance(cards, list):
        raise server.unexpected(path, f"'data' is not a list ({_glimpse(cards)})")
    if not cards:
        raise ModelUnavailableError(f"--server {server.url}: the server lists no model")
    for k, card in enumerate(cards):
        if not isinstance(card, dict) or not isinstance(card.get("id"), str) or not card["id"]:
            raise server.unexpected(path, f"model {k} has no 'id' string ({_glimpse(card)})")
    names = [card["id"] for card in cards]
    if model is not None and model not in names:
        raise UsageError(f"--model {model}: the server at {server.url} serves {', '.join(map(repr, names))}")
    card = cards[names.index(model) if model is not None else 0]
    context, revision = card.get("max_model_len"), card.get("revision")
    if not _is_int(context) or context < 1:
        raise server.unexpected(path, f"the model's 'max_model_len' is not a number of tokens ({_glimpse(context)})")
    if revision is not None and not isinstance(revision, str):
        raise server.unexpected(path, f"the model's 'revision' is not a string ({_glimpse(revision)})")
    return card["id"], context, revision or "unknown"


def _choices(server: _Server, event: dict[str, Any], sequences: dict[int, _Sequence]) -> list[dict[str, Any]]:
    """The choices of one stream event, each checked: an index asked for and not yet finished,
    `text`, `token_ids`, and a finish reason of OpenAI's ("stop", "length") or null."""
    choices = event.get("choices")
    if not isinstance(choices, list):
        raise server.unexpected(COMPLETIONS, f"an event without a 'choices' list ({_glimpse(event)})")
    for c in choices:
        i = c.get("index") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not _is_int(i) or i not in sequences:
            why = f"a choice with an index that was not asked for ({_glimpse(c)})"
        elif sequences[i].finish_reason is not None:
            why = f"more of sequence {i} after its finish reason"
        elif not isinstance(c.get("text"), str):
            why = f"sequence {i}'s 'text' is not a string ({_glimpse(c.get('text'))})"
        elif not _is_ids(c.get("token_ids")):
            why = f"sequence {i}'s 'token_ids' is not a list of token ids ({_glimpse(c.get('token_ids'))})"
        elif c.get("finish_reason") not in (None, "stop", "length"):
            why = f"sequence {i}'s 'finish_reason' is {_glimpse(c.get('finish_reason'))}, not 'stop', 'length' or null"
        elif not (c.get("stop_reason") is None or isinstance(c["stop_reason"], str) or _is_int(c["stop_reason"])):
            why = f"sequence {i}'s 'stop_reason' is {_glimpse(c['stop_reason'])}"
        else:
            continue
        raise server.unexpected(COMPLETIONS, why)
    return choices


def _result(future: Future[list[Completion]] | None) -> list[Completion] | RecordError:
    """A request's completions ([] for an item with no request), or its RecordError."""
    if future is None:
        return []
    try:
        return future.result()
    except RecordError as exc:  # the server refused this request alone: an error record
        return exc


def _record_refusal(status: int, error: dict[str, Any] | None, message: str) -> RecordError | None:
    """The RecordError a local run gives for what the server refused about one prompt (a 400 with
    one of its prompt codes, or a body too large), its message as a record's; None otherwise."""
    if status == 413:
        return RecordError("prompt_too_long", f"the request for this prompt is larger than the server takes ({message})")
    given = error.get("code") if error is not None else None
    code = RECORD_CODES.get(given) if isinstance(given, str) else None
    if code is None:
        return None
    for api, record in (("'prompt': ", ""), ("'prompt' ", "the prompt ")):
        if message.startswith(api):
            message = record + message[len(api) :]
            break
    return RecordError(code, message)


def _error_body(data: bytes) -> dict[str, Any] | None:
    """OpenAI's error object ({"error": {"message": ..., "code": ...}}) of a body, when it is one."""
    try:
        error = jsondata.loads(data).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, dict) and isinstance(error.get("message"), str) else None


def _error_text(error: dict[str, Any] | None, data: bytes) -> str:
    if error is None:
        return _glimpse(data)
    code = error.get("code")
    return " ".join(error["message"].split()) + (f" ({code})" if isinstance(code, str) and code else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) and t >= 0 for t in value)


def _glimpse(value: Any, limit: int = 80) -> str:
    """A short one-line quote of what the server sent: bytes as a quoted string, a JSON value as JSON."""
    raw = isinstance(value, (bytes, bytearray))
    if raw:
        text = bytes(value[: limit * 4]).decode("utf-8", "replace")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    text = " ".join(text.split())
    text = text[:limit] + ("..." if len(text) > limit else "")
    return repr(text) if raw else text


def _retry_after(value: str | None) -> float:
    """Seconds to wait before retrying a 503: its Retry-After in seconds, 1 when it has none, at most 10."""
    try:
        seconds = float(value or 1)
    except ValueError:
        seconds = 1.0
    return min(seconds, 10.0) if math.isfinite(seconds) and seconds > 0 else 1.0


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
