"""One request's parsing or tokenizing never starves the others: while 4 MB bodies are being handled
(a token-id prompt near --max-body, a /tokenize of 4 MB of text, a /tokenize of a million
characters that is tokenized, all of them at once), /health answers within 100 ms and a stream in
flight keeps its pace (its longest gap between events within twice its longest gap alone); the
large bodies are prepared in a helper process that answers as the server's own process would, and
that is replaced when it dies. Stop-string matching is linear in the generated text."""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serving import KEY, MODEL, Server

STREAM = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "min_tokens": 400, "decoding": "greedy", "stream": True}
HEAVY = {  # (path, body, status, param): bodies of about 4 MB, and what the server answers them
    "token ids": ("/v1/completions", b'{"model": "tiny-random", "prompt": [' + b", ".join([b"17"] * 1_000_000) + b"]}", 400, "prompt"),
    "4 MB text": ("/tokenize", json.dumps({"prompt": "ab " * 1_390_000}).encode(), 400, "prompt"),
    "tokenized": ("/tokenize", json.dumps({"prompt": "hello world, this is a test. " * 34_000}).encode(), 200, None),
}


def _post(server: Server, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _stream_gaps(server: Server) -> list[float]:
    """Seconds between the stream's events as they arrive (from its second token on: the first
    waits for the prompt's prefill, which is not a gap between tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(STREAM).encode(), headers={"Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        assert r.status == 200
        times = []
        while line := r.fp.readline():
            if line.startswith(b"data: "):
                times.append(time.perf_counter())
                if line.strip() == b"data: [DONE]":
                    break
    finally:
        conn.close()
    assert len(times) > 100, len(times)
    return [b - a for a, b in zip(times[1:], times[2:])]


def _health(server: Server) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        started = time.perf_counter()
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        return time.perf_counter() - started
    finally:
        conn.close()


class Load:
    """Heavy requests sent again and again on threads (each answer checked), and /health asked
    every 20 ms, until stopped."""

    def __init__(self, server: Server, names: list[str], copies: int = 1) -> None:
        self.server, self.stopping = server, threading.Event()
        self.health: list[float] = []
        self.answers: dict[str, int] = dict.fromkeys(names, 0)
        self.problems: list[str] = []
        self.threads = [threading.Thread(target=self._heavy, args=(n,), daemon=True) for n in names for _ in range(copies)]
        self.threads.append(threading.Thread(target=self._ask_health, daemon=True))
        for t in self.threads:
            t.start()

    def _heavy(self, name: str) -> None:
        path, body, status, param = HEAVY[name]
        while not self.stopping.is_set():
            got, data = _post(self.server, path, body)
            if got != status or (param is not None and json.loads(data)["error"]["param"] != param):
                self.problems.append(f"{name}: {got} {data[:200]!r}")
            self.answers[name] += 1

    def _ask_health(self) -> None:
        while not self.stopping.is_set():
            self.health.append(_health(self.server))
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("load"))
    yield s
    s.stop()


SLICE = 0.025  # seconds: about one scheduler time slice of a loaded Linux machine


class Burner:
    """A process that only burns CPU, at the helper process's priority: the machine as busy as the
    helper makes it, with nothing going through the server."""

    def __enter__(self) -> Burner:
        from aigc_cli.frontends.server.prepare import HELPER_NICENESS

        code = f"import os; os.nice({HELPER_NICENESS})\nwhile True: pass"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("names, copies", [(["token ids"], 1), (["4 MB text"], 1), (["tokenized"], 1), (list(HEAVY), 2)],
                         ids=["token-ids", "4MB-text", "tokenized", "all-in-parallel"])
def test_large_bodies_starve_nothing(server, names, copies):
    """Rounds of: the stream alone, the stream beside a process that burns a core at the helper's
    priority (the normal gap on a machine as busy as the large bodies make it), then the stream
    while the large bodies are handled.

    The bounds, on a shared CI machine that may deschedule any process now and then: /health's
    median within 100 ms and its slowest within 500 ms (the stall this guards against, parsing or
    tokenizing in the server's process, held it for 0.1-1.5 s on these loads); the stream's
    longest gap under load within twice its normal longest gap (and one time slice), comparing the medians of five
    rounds (the stall showed in every round, at 10-100 times the gap alone; a hiccup of the
    machine in one round does not decide). The control with the burner is what makes the bound
    about the server: on two busy cores, any process that takes CPU, the helper included, makes
    every gap longer, and that is the machine's doing, not the server's; the gap alone is
    printed beside it."""
    alone, normal, loaded, lines = [], [], [], []
    for _ in range(5):
        alone.append(max(_stream_gaps(server)))
        with Burner():
            normal.append(max(_stream_gaps(server)))
        load = Load(server, names, copies)
        time.sleep(0.3)  # the large bodies are on their way or being prepared
        loaded.append(max(_stream_gaps(server)))
        load.stop()
        assert not load.problems, load.problems[:3]
        assert all(load.answers.values()), load.answers
        health = load.health
        lines.append(f"alone {alone[-1] * 1000:.1f} ms, beside a burner {normal[-1] * 1000:.1f} ms, loaded {loaded[-1] * 1000:.1f} ms; "
                     f"/health median {statistics.median(health) * 1000:.1f} max {max(health) * 1000:.1f} ms ({len(health)}); "
                     f"answers {load.answers}")
        assert statistics.median(health) < 0.1 and max(health) < 0.5, lines
    print("\n".join(lines))
    # plus one scheduler time slice (25 ms): the tiny model's gaps are a few ms, where one slice
    # given to another process doubles a gap; the stall this guards against was 90-1232 ms, and with
    # the bodies prepared in the server's process 150-200 ms against 30 ms, still far past the bound
    assert statistics.median(loaded) <= 2 * statistics.median(normal) + SLICE, lines


def test_the_helper_answers_as_the_server_process_does(tmp_path):
    """The same bodies prepared here and in the helper process: equal results, equal errors."""
    import asyncio

    from aigc_cli.engine.engine import Engine
    from aigc_cli.frontends.server.prepare import Helper, Preparer
    from aigc_cli.protocol.errors import APIError

    preparer = Preparer(MODEL, Engine.load(MODEL), "{% for m in messages %}{{ m.content }}{% endfor %}")
    bodies: list[tuple[str, Any]] = [
        ("tokenize", {"prompt": "Hello there", "return_token_strs": True}),
        ("tokenize", {"prompt": "x\udfff"}),
        ("tokenize", {"prompt": "x", "model": "other"}),
        ("detokenize", {"tokens": [72, 101, 300]}),
        ("detokenize", {"tokens": [10**30]}),
        ("completion", {"model": MODEL, "prompt": ["Hello", [72, 101]], "max_tokens": 3, "n": 2, "seed": 1}),
        ("completion", {"model": MODEL, "prompt": [17] * 2000}),
        ("completion", {"model": MODEL, "prompt": "Hi", "temperature": "hot"}),
        ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5000}),
        ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "echo": True}),
    ]

    def outcome(run: Any) -> Any:
        try:
            value = run()
        except APIError as exc:
            return exc.body()
        return value.__dict__ if hasattr(value, "__dict__") else value

    helper = Helper(preparer, print)
    try:
        for kind, body in bodies:
            raw = json.dumps(body).encode()
            here = outcome(lambda: getattr(preparer, kind)(raw))
            there = outcome(lambda: asyncio.run(helper.run(kind, raw)))
            assert here == there, (kind, body)
        assert here["error"]["param"] == "echo"
    finally:
        helper.close()


def test_without_a_helper_the_server_prepares_bodies_itself():
    """A tokenizer that cannot be copied to another process: no helper (one warning line), and
    a large body is prepared in the server's process, with the same answer."""
    from aigc_cli.engine.engine import Engine
    from aigc_cli.frontends.server.prepare import Helper, Preparer

    engine = Engine.load(MODEL)
    preparer = Preparer(MODEL, engine, None)
    preparer.vocabulary.conventions = lambda: None  # a lambda cannot be pickled
    lines: list[str] = []
    assert Helper.started(preparer, lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("aigc serve: warning: no helper process for large requests"), lines
    text = "hello there " * 10_000
    assert json.loads(preparer.tokenize(json.dumps({"prompt": text}).encode()))["tokens"] == engine.tokenizer.encode(text, add_special_tokens=True)


def test_a_helper_that_dies_is_replaced(tmp_path):
    """Killing the helper process mid-way: that request is prepared in the server's process, the
    next one goes to a new helper, and the server never answers 5xx."""
    s = Server(tmp_path)
    try:
        body = json.dumps({"prompt": "hello world " * 40_000}).encode()
        assert _post(s, "/tokenize", body)[0] == 200
        import psutil

        def helpers() -> list[int]:  # multiprocessing's spawned workers (not its resource tracker)
            return [p.pid for p in psutil.Process(s.proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]

        first = helpers()
        assert len(first) == 1, first
        os.kill(first[0], signal.SIGKILL)
        for _ in range(3):
            status, data = _post(s, "/tokenize", body)
            assert status == 200 and json.loads(data)["count"] > 0
        again = helpers()
        assert len(again) == 1 and again != first, (first, again)
        assert "helper process that prepares large requests died" in s.log.read_text()
    finally:
        s.stop()
    assert "Traceback" not in s.log.read_text()


def test_the_helper_ends_with_the_server(tmp_path):
    """A server killed outright (no time to close its helper): the helper ends within seconds
    instead of living on as an orphan."""
    import psutil

    s = Server(tmp_path)
    deadline = time.monotonic() + 30
    while not (helpers := [p for p in psutil.Process(s.proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]):
        assert time.monotonic() < deadline, "no helper process"
        time.sleep(0.1)
    s.proc.kill()
    s.proc.wait(10)
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, alive


def _row_cost(n_tokens: int, stops: list[str]) -> tuple[int, int]:
    """Characters the stop-string search reads while a row of `n_tokens` generated tokens grows:
    in all, and at most in one step."""
    import aigc_cli.engine.decoding as decoding
    from aigc_cli.core.settings import GenerationSettings
    from aigc_cli.models.tiny import hf_tokenizer

    read, most = 0, 0
    real = decoding.find_stop

    def counting(text: str, s: Any) -> Any:
        nonlocal read, most
        read, most = read + len(text), max(most, len(text))
        return real(text, s)

    tok = hf_tokenizer(MODEL)
    settings = GenerationSettings(max_new_tokens=n_tokens, stop=tuple(stops)).resolved()
    row = decoding._Row(tok, "")
    decoding.find_stop = counting
    try:
        for step in range(n_tokens):
            row.push(72 + step % 20, step, None, settings)
    finally:
        decoding.find_stop = real
    assert row.finish_reason == "length" and len(row.text) == n_tokens
    return read, most


def test_stop_string_search_is_linear_in_the_generated_text():
    """Characters searched per generated token do not grow with the text (the longest stop string
    and the few undecided tokens at most, with the longest stop strings the API takes), so the
    work of a row's whole text grows as the text, not as its square: from 4,000 to 8,000 tokens,
    the second 4,000 cost what the first did, less the first stop-length's worth."""
    from aigc_cli.core.settings import MAX_STOP_CHARS, MAX_STOPS

    stops = ["z" * MAX_STOP_CHARS] * MAX_STOPS
    (small, most_small), (large, most_large) = _row_cost(4_000, stops), _row_cost(8_000, stops)
    assert most_small == most_large <= MAX_STOP_CHARS + 16, (most_small, most_large)
    assert 2.0 <= large / small <= 2.2, (small, large)


def _lines_run(fn: Any, *args: Any) -> int:
    """Python lines executed by a call of `fn` (its own and its callees')."""
    import sys

    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


def test_stream_safe_length_does_not_try_every_length():
    """What a stream may show now (computed for every event of a stream, on the server's event
    loop): equal to a naive reading of its rule on random cases, and where no end of the text can
    start a stop string, a few steps per stop string however long it is (the candidate starts
    are found by str.find at C speed), where trying every length from the longest down took a
    step, a slice and a comparison per character of each stop string, for each event."""
    import random

    from aigc_cli.core.textrules import stream_safe_length

    def naive(text: str, stops: list[str]) -> int:
        n = len(text)
        while n and text[n - 1] == "\ufffd":
            n -= 1
        for s in stops:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[n - k : n] == s[:k]:
                    n -= k
                    break
        return n

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab\ufffd") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 3))]
        assert stream_safe_length(text, stops) == naive(text, stops), (text, stops)
    steps = []
    for m in (100, 1_000):
        text, stops = "x" * (4 * m), ["a" * m] * 16
        assert stream_safe_length(text, stops) == naive(text, stops) == len(text)
        steps.append(_lines_run(stream_safe_length, text, stops))
    assert steps[0] == steps[1] <= 16 * 10, steps
