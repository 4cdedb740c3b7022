"""`aigc generate --server`: the client never passes off what it did not get.

Fake servers on loopback sockets (scripted replies: wrong shapes, cut streams, silence) check that
every failure is a one-line error naming the server and the endpoint, with the documented exit
code, and never a record; a live `aigc serve` checks that the client's error records equal a
local run's and that a file cut by a failing stream is completed by --resume.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aigc_cli.engine.scheduler import Scheduler
from tests.serving import KEY, MODEL, InProcessServer, Server

# -- a scripted server ------------------------------------------------------------------------------

Reply = Any  # bytes to send before closing, or a callable(socket, stop event) that does what it likes


def http(status: int, body: bytes, kind: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def js(value: Any, status: int = 200) -> bytes:
    return http(status, json.dumps(value).encode())


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def sse(*events: Any, done: bool = True) -> bytes:
    """A stream of these events (a dict as JSON, bytes as they are), then [DONE] unless not."""
    body = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return SSE_HEAD + body + (b"data: [DONE]\n\n" if done else b"")


def choice(index: int = 0, text: str = "ok", ids: Any = (7,), finish: Any = "length", **extra: Any) -> dict:
    return {"choices": [{"index": index, "text": text, "token_ids": list(ids), "finish_reason": finish, "stop_reason": None, **extra}]}


def good_completion(body: dict) -> bytes:
    wanted = body.get("indices") or range(body.get("n", 1))
    return sse(*[choice(i, f"seq {i} of {body['prompt']}", (7, 8)) for i in wanted])


ROUTES: dict[str, Callable[[Any], Reply]] = {
    "/v1/models": lambda body: js({"object": "list", "data": [{"id": "fake", "max_model_len": 1024, "revision": "r1"}]}),
    "/tokenize": lambda body: js({"tokens": [1] * len(body["prompt"].split()), "count": 0}),
    "/v1/completions": good_completion,
}


class Fake:
    """An HTTP server on a free loopback port whose replies are `routes[path](request body)`; it
    keeps the requests it got. One request per connection (its replies say Connection: close)."""

    def __init__(self, **routes: Callable[[Any], Reply]) -> None:
        self.routes = {**ROUTES, **{"/" + k.replace("_", "/"): v for k, v in routes.items()}}
        self.requests: list[tuple[str, Any]] = []
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            first = f.readline().decode()
            if not first:
                return  # a client that closed before asking (the requests dropped after a failure)
            method, path, _ = first.split(" ", 2)
            length = 0
            while (line := f.readline().strip()) != b"":
                name, _, value = line.decode().partition(":")
                length = int(value) if name.lower() == "content-length" else length
            raw = f.read(length) if length else b""
            if len(raw) < length:
                return  # a client that closed while sending its body (the requests dropped after a failure)
            body = json.loads(raw) if length else None
            self.requests.append((path, body))
            route = self.routes.get(path, lambda body: js({"error": {"message": "no such endpoint"}}, 404))
            reply = route(body)
            if callable(reply):
                reply(conn, self.stop)
            else:
                conn.sendall(reply)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def fake():
    servers: list[Fake] = []

    def make(**routes: Callable[[Any], Reply]) -> Fake:
        servers.append(Fake(**routes))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def stall_after(data: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """A reply that sends `data`, then nothing (until the test ends)."""

    def reply(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
        stop.wait(60)

    return reply


def one_line_error(result, *parts: str) -> str:
    """The run's one error line, checked to name each of `parts`, with no traceback and no record."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aigc: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", (result.stdout, result.stderr)
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# -- defects on main: an empty input, a malformed URL ---------------------------------------------


def test_an_empty_input_does_nothing_as_a_local_run_does(cli, fake, tmp_path):
    server = fake()
    (tmp_path / "empty.txt").write_text("")
    for args in (["-"], ["-f", str(tmp_path / "empty.txt")]):
        remote = cli("generate", *args, "--server", server.url, input="")
        here = cli("generate", *args, "--model", MODEL, input="")
        assert remote.exit_code == here.exit_code == 0, remote.stderr
        assert remote.stdout == here.stdout == ""


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://[bad", "not a valid URL"),
        ("http://host:99999", "Port out of range"),
        ("http://host:port", "not a valid URL"),
        ("ftp://x", "not an http:// or https:// URL"),
        ("localhost:8000", "not an http:// or https:// URL"),
        ("http://", "names no host"),
        ("http://h:0", "port 0"),
        ("http://a b:8000", "space or a control character"),
        ("http://user:secret@h:8000", "--api-key"),
        ("http://h:8000/?q=1", "query or fragment"),
    ],
)
def test_a_malformed_url_is_a_usage_error_before_anything_opens(cli, tmp_path, url, why):
    out = tmp_path / "out.jsonl"
    result = cli("generate", "Hi", "--server", url, "-o", str(out))
    assert result.exit_code == 2, result.stderr
    one_line_error(result, "--server", why)
    assert not out.exists()  # checked before the output file was opened


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--read-timeout", "0"], "--read-timeout"),
        (["--read-timeout", "-3"], "--read-timeout"),
        (["--connect-timeout", "nan"], "--connect-timeout"),
        (["--connect-timeout", "inf"], "--connect-timeout"),
        (["--read-timeout", "1e9"], "--read-timeout"),
    ],
)
def test_bad_timeouts_are_usage_errors(cli, args, flag):
    result = cli("generate", "Hi", "--server", "http://127.0.0.1:9", *args)
    assert result.exit_code == 2
    one_line_error(result, flag)


def test_timeouts_without_a_server_are_a_usage_error(cli):
    result = cli("generate", "Hi", "--model", MODEL, "--read-timeout", "5")
    assert result.exit_code == 2
    one_line_error(result, "--read-timeout", "--server")


# -- timeouts -------------------------------------------------------------------------------------


def test_a_server_that_accepts_and_never_answers_ends_at_the_read_timeout(cli):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts the connection; nobody ever reads or answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        result = cli("generate", "Hi", "--server", url, "--read-timeout", "1.5")
        took = time.monotonic() - start
    finally:
        listener.close()
    assert result.exit_code == 1, result.stderr
    one_line_error(result, url, "/v1/models", "read timeout of 1.5 s", "--read-timeout")
    assert 1.4 < took < 10


def test_a_stream_that_stalls_after_its_headers_ends_at_the_read_timeout(cli, fake, tmp_path):
    server = fake(v1_completions=lambda body: stall_after(SSE_HEAD + b"data: " + json.dumps(choice(finish=None)).encode() + b"\n\n"))
    start = time.monotonic()
    result = cli("generate", "Hi", "--server", server.url, "--read-timeout", "1", "--format", "jsonl")
    took = time.monotonic() - start
    assert result.exit_code == 1, result.stderr
    one_line_error(result, server.url, "/v1/completions", "read timeout of 1 s", "--read-timeout")
    assert 0.9 < took < 10


def test_a_connect_that_hangs_ends_at_the_connect_timeout(cli):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):  # fill the accept queue: the kernel drops further SYNs, so a connect hangs
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    try:
        try:
            socket.create_connection(address, timeout=0.5).close()
            pytest.skip("this kernel accepts connections beyond a full backlog")
        except TimeoutError:
            pass
        url = f"http://127.0.0.1:{address[1]}"
        start = time.monotonic()
        result = cli("generate", "Hi", "--server", url, "--connect-timeout", "1")
        took = time.monotonic() - start
    finally:
        for s in (*fillers, listener):
            s.close()
    assert result.exit_code == 3, result.stderr
    one_line_error(result, url, "connect timeout of 1 s", "--connect-timeout")
    assert 0.9 < took < 10


def test_one_failing_request_drops_the_others_in_flight_at_once(cli, fake, tmp_path):
    """The records in flight beside a failure do not hold the run until their own timeouts."""

    def completions(body: dict) -> Reply:
        number = int(body["prompt"][1:])
        if number == 3:
            return sse({"error": {"message": "the engine fell over", "code": "engine_error"}}, done=False)
        return good_completion(body) if number < 3 else stall_after(SSE_HEAD)

    server = fake(v1_completions=completions)
    (tmp_path / "in.txt").write_text("".join(f"p{i}\n" for i in range(8)))
    start = time.monotonic()
    result = cli("generate", "-f", str(tmp_path / "in.txt"), "--server", server.url, "--read-timeout", "60")
    assert result.exit_code == 1
    assert time.monotonic() - start < 20
    assert "the engine fell over (engine_error)" in result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [1, 2, 3]  # lines 1-3


# -- cut streams -----------------------------------------------------------------------------------


def chunked(*pieces: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


EVENT = b"data: " + json.dumps(choice(finish=None)).encode() + b"\n\n"
LAST = b"data: " + json.dumps(choice(text="", ids=(), finish="length")).encode() + b"\n\n"


@pytest.mark.parametrize(
    "reply, why",
    [
        (sse(choice(finish=None), done=False), "closed before data: [DONE]"),
        (sse(choice(finish="length"), done=False), "closed before data: [DONE]"),
        (sse(choice(finish=None)), "before sequence 0 had its finish reason"),
        (SSE_HEAD + EVENT + LAST + b"data: [DONE]", "closed before data: [DONE] (in the middle of an event)"),
        (SSE_HEAD + EVENT + b'data: {"choices": [{"index": 0, "te', "closed before data: [DONE] (in the middle of an event)"),
        (chunked(EVENT, LAST), "the stream ended early"),  # no last chunk
        (chunked(EVENT)[:-20], "the stream ended early"),  # a chunk cut short
        (chunked(EVENT) + b"zz\r\n", "the stream ended early"),  # a chunk size that is not one
    ],
    ids=["no-finish-no-done", "no-done", "done-before-finish", "done-unterminated", "event-cut", "no-last-chunk", "chunk-cut", "bad-chunk"],
)
def test_a_cut_stream_is_an_error_never_a_sequence(cli, fake, reply, why):
    server = fake(v1_completions=lambda body: reply)
    result = cli("generate", "Hi", "--server", server.url, "--format", "jsonl")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    one_line_error(result, server.url, "/v1/completions", why)


def test_an_error_event_is_an_error_naming_its_cause(cli, fake):
    event = {"error": {"message": "generation failed: out of memory", "type": "server_error", "param": None, "code": "engine_error"}}
    server = fake(v1_completions=lambda body: sse(choice(finish=None), event, done=False))
    result = cli("generate", "Hi", "--server", server.url, "--format", "jsonl")
    assert result.exit_code == 1
    one_line_error(result, server.url, "/v1/completions", "ended the stream with an error: generation failed: out of memory (engine_error)")


def test_a_cut_stream_keeps_what_was_complete_and_resume_finishes_the_file(cli, fake, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    src.write_text("".join(f"p{i}\n" for i in range(6)))
    cut = fake(v1_completions=lambda body: sse(choice(finish=None), done=False) if body["prompt"] == "p3" else good_completion(body))
    failed = cli("generate", "-f", str(src), "-o", str(out), "--server", cut.url, "--seed", "1", "-n", "2")
    assert failed.exit_code == 1
    assert [(r["id"], r["index"]) for r in map(json.loads, out.read_text().splitlines())] == [(i + 1, k) for i in range(3) for k in range(2)]
    whole = fake()
    resumed = cli("generate", "-f", str(src), "-o", str(out), "--server", whole.url, "--resume", "-n", "2")
    assert resumed.exit_code == 0, resumed.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["index"], r["text"]) for r in records] == [(i + 1, k, f"seq {k} of p{i}") for i in range(6) for k in range(2)]
    asked = [body.get("indices") for path, body in whole.requests if path == "/v1/completions"]
    assert asked == [[0, 1]] * 3  # only the records the cut run did not write


# -- replies of the wrong shape --------------------------------------------------------------------

HTML = http(200, b"<!DOCTYPE html>\n<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
PAGE_500 = http(500, b"<html>\n<head><title>500 Internal Server Error</title></head>\n<body>oops</body></html>", "text/html")


def card(**fields: Any) -> bytes:
    return js({"data": [{"id": "fake", "max_model_len": 1024, "revision": "r1", **fields}]})


@pytest.mark.parametrize(
    "route, reply, why",
    [
        ("v1_models", HTML, "not JSON ('<!DOCTYPE html> <html>"),
        ("v1_models", http(200, b"\x00\xffgarbage"), "not JSON"),
        ("v1_models", http(200, b""), "an empty body"),
        ("v1_models", PAGE_500, "HTTP 500: '<html> <head><title>500 Internal Server Error"),
        ("v1_models", http(502, b""), "HTTP 502: an empty body"),
        ("v1_models", js([1, 2]), "a body that is not a JSON object"),
        ("v1_models", js({"object": "list"}), "'data' is not a list"),
        ("v1_models", js({"data": "fake"}), "'data' is not a list"),
        ("v1_models", js({"data": [{"name": "fake"}]}), "model 0 has no 'id' string"),
        ("v1_models", js({"data": [5]}), "model 0 has no 'id' string"),
        ("v1_models", card(max_model_len=None), "'max_model_len' is not a number of tokens"),
        ("v1_models", card(max_model_len="1024"), "'max_model_len' is not a number of tokens"),
        ("v1_models", card(max_model_len=True), "'max_model_len' is not a number of tokens"),
        ("v1_models", card(max_model_len=0), "'max_model_len' is not a number of tokens"),
        ("v1_models", card(revision=3), "'revision' is not a string"),
        ("tokenize", js({"count": 1}), "'tokens' is not a list of token ids"),
        ("tokenize", js({"tokens": ["a", "b"]}), "'tokens' is not a list of token ids"),
        ("tokenize", js({"tokens": [1.0]}), "'tokens' is not a list of token ids"),
        ("tokenize", js({"tokens": [-1]}), "'tokens' is not a list of token ids"),
        ("tokenize", js({"tokens": [True]}), "'tokens' is not a list of token ids"),
        ("tokenize", HTML, "not JSON"),
        ("v1_completions", js({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}), "application/json instead of an event stream"),
        ("v1_completions", HTML, "text/html instead of an event stream"),
        ("v1_completions", http(200, b"", ""), "instead of an event stream"),
        ("v1_completions", PAGE_500, "HTTP 500"),
        ("v1_completions", sse(b"hello"), "a stream event that is not JSON ('hello')"),
        ("v1_completions", sse([1]), "a stream event that is not a JSON object"),
        ("v1_completions", sse({"id": "x"}), "an event without a 'choices' list"),
        ("v1_completions", sse({"choices": {"index": 0}}), "an event without a 'choices' list"),
        ("v1_completions", sse({"choices": ["x"]}), "a choice with an index that was not asked for"),
        ("v1_completions", sse(choice(index=3)), "a choice with an index that was not asked for"),
        ("v1_completions", sse(choice(index="0")), "a choice with an index that was not asked for"),
        ("v1_completions", sse(choice(text=5)), "sequence 0's 'text' is not a string (5)"),
        ("v1_completions", sse(choice(text=None)), "sequence 0's 'text' is not a string"),
        ("v1_completions", sse(choice(ids=["7"])), "sequence 0's 'token_ids' is not a list of token ids"),
        ("v1_completions", sse({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}), "'token_ids' is not a list"),
        ("v1_completions", sse(choice(finish="banana")), 'sequence 0\'s \'finish_reason\' is "banana"'),
        ("v1_completions", sse(choice(finish=1)), "sequence 0's 'finish_reason' is 1"),
        ("v1_completions", sse(choice(stop_reason=1.5, finish="stop")), "sequence 0's 'stop_reason' is 1.5"),
        ("v1_completions", sse(choice(), choice()), "more of sequence 0 after its finish reason"),
        ("v1_completions", sse(choice(ids=(), finish="stop")), "ended on a token that is not among its token_ids"),
        ("v1_completions", sse(choice(ids=(4, 5), finish="stop", stop_reason=9)), "ended on a token that is not among its token_ids"),
    ],
)
def test_a_reply_of_the_wrong_shape_is_a_one_line_error(cli, fake, route, reply, why):
    server = fake(**{route: lambda body: reply})
    result = cli("generate", "Hi", "--server", server.url, "--format", "jsonl")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    path = "/" + route.replace("_", "/")
    one_line_error(result, f"--server {server.url}: {path}", why)


def test_a_reply_too_large_is_refused_unread(cli, fake, monkeypatch):
    from aigc_cli.frontends import client

    monkeypatch.setattr(client, "MAX_REPLY", 1000)
    server = fake(v1_completions=lambda body: sse(b'{"choices": [], "pad": "' + b"x" * 2000 + b'"}'))
    result = cli("generate", "Hi", "--server", server.url)
    assert result.exit_code == 1
    one_line_error(result, "/v1/completions", "a line of its stream is larger than 1,000 bytes")


# -- prompts: the checks and error records of a local run --------------------------------------------


def test_the_client_checks_prompts_before_it_asks_the_server_and_tokenizes_them_as_the_model_sees_them(cli, fake, tmp_path):
    server = fake()
    (tmp_path / "in.jsonl").write_text('{"prompt": "bad \\ud800"}\n{"prompt": ""}\n{"prompt": "Hi there"}\n')
    result = cli("generate", "-f", str(tmp_path / "in.jsonl"), "--server", server.url)
    assert result.exit_code == 4, result.stderr
    assert [body for path, body in server.requests if path == "/tokenize"] == [{"model": "fake", "prompt": "Hi there", "add_special_tokens": True}]


def test_the_servers_refusal_of_a_prompt_is_that_records_error(cli, fake, tmp_path):
    refusals = {
        "p1": js({"error": {"message": "'prompt' is not valid Unicode (a lone surrogate U+D800 at character 2)", "param": "prompt", "code": "invalid_text"}}, 400),
        "p2": js({"error": {"message": "'prompt' has 2,000,000 characters; /tokenize takes at most 1,048,576", "code": "too_long"}}, 400),
        "p3": js({"error": {"message": "the request body is larger than 4,194,304 bytes (--max-body)", "code": "body_too_large"}}, 413),
    }
    server = fake(tokenize=lambda body: refusals.get(body["prompt"]) or ROUTES["/tokenize"](body))
    (tmp_path / "in.txt").write_text("p0\np1\np2\np3\np4\n")
    result = cli("generate", "-f", str(tmp_path / "in.txt"), "--server", server.url)
    assert result.exit_code == 4, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("error") for r in records] == [
        None,
        {"code": "invalid_text", "message": "line 2: the prompt is not valid Unicode (a lone surrogate U+D800 at character 2)"},
        {"code": "prompt_too_long", "message": "line 3: the prompt has 2,000,000 characters; /tokenize takes at most 1,048,576"},
        {"code": "prompt_too_long", "message": "line 4: the request for this prompt is larger than the server takes (the request body is larger than 4,194,304 bytes (--max-body))"},
        None,
    ]


def test_a_refusal_that_is_not_about_the_prompt_stops_the_run(cli, fake, tmp_path):
    server = fake(v1_completions=lambda body: js({"error": {"message": "unknown parameter 'record_id'", "code": None}}, 400))
    (tmp_path / "in.txt").write_text("p0\np1\n")
    result = cli("generate", "-f", str(tmp_path / "in.txt"), "--server", server.url)
    assert result.exit_code == 2
    one_line_error(result, server.url, "/v1/completions", "the server refused the request: unknown parameter 'record_id'")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("client"))
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_error_records_through_a_server_equal_a_local_runs(cli, live, tmp_path):
    src = tmp_path / "in.jsonl"
    records = [
        {"id": 1, "prompt": "Hello there"},
        {"id": 2, "prompt": "bad \ud800"},
        {"id": 3, "prompt": ""},
        {"id": 4, "prompt": "word " * 1100},  # too long in tokens (not in characters)
        {"id": 5, "prompt": "  "},
        {"id": 6, "prompt": "Bye now", "max_new_tokens": 1023},
        {"id": 7, "prompt": "Hi", "stop_token_ids": [5000]},  # refused by the server (the client does not know the vocabulary)
        {"id": 8, "prompt": "Last one"},
    ]
    from tests.test_records import BAD

    text = "".join(json.dumps(r) + "\n" for r in records) + "".join(v + "\n" for v in BAD.values()) + '{"prompt": "After them"}\n'
    src.write_bytes(text.encode() + b'{"prompt": "bad \xff byte"}\n{"prompt": "The end"}\n')  # a line that is not UTF-8
    args = ("generate", "-f", str(src), "--seed", "3", "--max-new-tokens", "4")
    here = cli(*args, "--model", MODEL)
    remote = cli(*args, env={"AIGC_SERVER": live.url, "AIGC_API_KEY": KEY})
    assert here.exit_code == remote.exit_code == 4, remote.stderr
    assert remote.stdout == here.stdout
    codes = [json.loads(line).get("error", {}).get("code") for line in here.stdout.splitlines()]
    assert codes == [None, "invalid_text", "empty_prompt", "prompt_too_long", "empty_prompt", "prompt_too_long", "bad_token", None, *BAD, None, "invalid_utf8", None]


def test_a_sequence_ended_by_a_stop_token_counts_as_a_local_runs(cli, live):
    from aigc_cli.engine.engine import Engine
    from aigc_cli.core.settings import GenerationSettings

    engine = Engine.load(MODEL)
    s = GenerationSettings(decoding="greedy", max_new_tokens=12).resolved()
    ids = engine.encode("Hello there", s)
    from aigc_cli.engine.requests import Request

    first = next(iter(engine.generate([Request(0, "Hello there", s, 0, prompt_ids=tuple(ids))])))
    stop = first.token_ids[3]
    args = ("generate", "Hello there", "--decoding", "greedy", "--max-new-tokens", "12", "--stop-token-id", str(stop), "--format", "jsonl", "--seed", "1")
    here = cli(*args, "--model", MODEL)
    remote = cli(*args, env={"AIGC_SERVER": live.url, "AIGC_API_KEY": KEY})
    assert here.exit_code == remote.exit_code == 0, remote.stderr
    assert json.loads(here.stdout)["completion_tokens"] == 3 and json.loads(here.stdout)["finish_reason"] == "stop"
    assert remote.stdout == here.stdout


def test_a_server_error_mid_file_keeps_the_records_before_it_and_resume_completes_them(cli, tmp_path, monkeypatch):
    src, local_out, out = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Record {i} begins"}) + "\n" for i in range(10)))
    args = ("generate", "-f", str(src), "--seed", "9", "-n", "2", "--max-new-tokens", "8")
    assert cli(*args, "-o", str(local_out), "--model", MODEL).exit_code == 0
    server = InProcessServer()
    try:
        doomed = server.state.engine.tokenizer.encode("Record 6 begins")
        steps = {"n": 0}

        def fault(spec) -> None:
            if spec.prompt_ids == doomed:
                steps["n"] += 1
                if steps["n"] >= 3:  # after some of its tokens went out
                    raise RuntimeError("injected fault")

        monkeypatch.setattr(Scheduler, "fault", staticmethod(fault))
        failed = cli(*args, "-o", str(out), "--server", server.url)
        assert failed.exit_code == 1
        assert "/v1/completions: the server ended the stream with an error" in failed.stderr and "injected fault" in failed.stderr
        assert out.read_text() == "".join(local_out.read_text().splitlines(keepends=True)[:12])  # records r0-r5, whole
        monkeypatch.undo()
        resumed = cli(*args, "-o", str(out), "--server", server.url, "--resume")
        assert resumed.exit_code == 0, resumed.stderr
        assert out.read_text() == local_out.read_text()
    finally:
        server.stop()
