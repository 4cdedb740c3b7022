"""No client can make `aigc serve` answer 5xx, stall a stream or disturb the others: schemathesis
on the server's own OpenAPI document (positive and negative data), hypothesis strategies that mix
valid and hostile values (lone surrogates, 400-digit numbers, NaN, wrong types, unknown keys, deep
nesting, long strings and lists), raw bytes that are not JSON, and the defects these found as a
table of hand-written cases; all of it against one server in a subprocess while a few greedy
streams run beside it, which must come out byte-identical to the same streams run alone."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from aigc_cli.models.tiny import spec
from tests.serving import KEY, MODEL, Server, sse_events

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
REQUIRED = {COMPLETIONS: ("model", "prompt"), CHAT: ("model", "messages"), TOKENIZE: ("prompt",), DETOKENIZE: ("tokens",)}
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 3},
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    TOKENIZE: {"prompt": "Hello"},
    DETOKENIZE: {"tokens": [72, 101]},
}
VOCAB = spec(MODEL).vocab_size  # tiny-random's tokenizer: 256 bytes, <|endoftext|>, common word prefixes
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
# every run draws the same examples (derandomized: CI is reproducible); the long variant draws ten
# times as many, and is marked slow
SCALES = [pytest.param(1, id="quick"), pytest.param(10, id="long", marks=pytest.mark.slow)]
SIDE_PROMPTS = ("the sea at night", "Once upon a time", "Dear diary,")
ERROR_KEYS = {"message", "type", "param", "code"}


# -- the server, the side streams and the checks ----------------------------------------------------


class Raw(str):
    """JSON text put into a body as it is (deep nesting the encoder would refuse, NaN, bad escapes)."""


class Deep(Raw):
    """Nesting `[[[...]]]` or `{"a": {"a": ...}}`, deeper than a parser may go."""


def dump(value: Any) -> str:
    """JSON text of `value`, ASCII only (a lone surrogate travels as a \\udfff escape), with NaN
    and Infinity as the bare tokens Python writes, and `Raw` pieces spliced in as they are."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=True)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=True)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    data: bytes


def send(server: Server, path: str, body: bytes, timeout: float = 60) -> Reply:
    """One POST on a connection of its own; a stream is read to its end (a stall fails here)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def _param_ok(param: Any, body: Any, path: str) -> bool:
    """A 400's param names a field of the body (an unknown key as the message quotes it) or a
    required one; it is null only when the body is not a JSON object at all."""
    if not isinstance(body, dict):
        return param is None
    names = {str(k) for k in body} | set(REQUIRED[path])
    return isinstance(param, str) and (param in names or (param.endswith("...") and any(n.startswith(param[:-3]) for n in names)))


def _whole_body(err: dict[str, Any]) -> bool:
    """An error about the body as a whole (not JSON, not an object, too large): no field to name."""
    return err["param"] is None and err["message"].startswith("the request body")


def check_error(reply: Reply, body: Any, path: str) -> dict[str, Any]:
    """A 4xx in OpenAI's shape, its param naming the field at fault."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    doc = json.loads(reply.data)
    assert set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS, doc
    err = doc["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if reply.status == 400:
        assert _whole_body(err) or _param_ok(err["param"], body, path), (err, str(body)[:300])
    if reply.status == 404:
        assert err["param"] == "model", err
    return err


def check_reply(reply: Reply, body: Any, path: str) -> None:
    """No 5xx (a 503 only for a full queue); 4xx in OpenAI's shape; a 200 well formed, a stream
    ending in [DONE] or an error event."""
    if reply.status == 503:
        assert json.loads(reply.data)["error"]["code"] == "queue_full", reply
        return
    assert reply.status < 500, (reply, str(body)[:300])
    if reply.status >= 400:
        check_error(reply, body, path)
        return
    assert reply.status == 200, reply
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(reply.data)
        assert events and (events[-1] == "[DONE]" or "error" in events[-1]), events[-3:]
        assert all(e == "[DONE]" or "choices" in e for e in events[:-1]), events
    else:
        assert isinstance(json.loads(reply.data), dict)


class SideStreams:
    """A few greedy streams run alone first, then again and again on threads beside the fuzzing;
    every run must equal its run alone, byte for byte (but the response id and time)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.alone = {p: self._run(p) for p in SIDE_PROMPTS}
        self.runs: dict[str, list[bytes]] = {p: [] for p in SIDE_PROMPTS}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(p,), daemon=True) for p in SIDE_PROMPTS]
        for t in self.threads:
            t.start()

    def _run(self, prompt: str) -> bytes:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 300, "min_tokens": 300, "decoding": "greedy", "stream": True,
                "return_token_ids": True}
        reply = send(self.server, COMPLETIONS, dump(body).encode(), timeout=120)
        assert reply.status == 200, reply
        events = sse_events(reply.data)
        assert events[-1] == "[DONE]", events[-2:]
        for e in events[:-1]:
            e.pop("id"), e.pop("created")
        return json.dumps(events).encode()

    def _loop(self, prompt: str) -> None:
        while not self.stopping.is_set():
            self.runs[prompt].append(self._run(prompt))

    def stop(self) -> dict[str, list[bytes]]:
        self.stopping.set()
        for t in self.threads:
            t.join(120)
        return self.runs


class Fuzzed:
    """The server under fuzzing, its side streams, and its log read as it grows."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "chat.jinja").write_text(TEMPLATE)
        self.server = Server(tmp, "--chat-template", str(tmp / "chat.jinja"), "--batch-size", "8", "--max-queue", "16")
        self.side = SideStreams(self.server)
        doc = json.loads(self.server.raw("GET", "/openapi.json")[2])
        names = {COMPLETIONS: "CompletionRequest", CHAT: "ChatCompletionRequest", TOKENIZE: "TokenizeRequest", DETOKENIZE: "DetokenizeRequest"}
        self.fields = {path: set(doc["components"]["schemas"][name]["properties"]) for path, name in names.items()}
        self.seen = 0
        self.requests = 0
        self.slowest: list[tuple[float, str, bytes]] = []

    def post(self, path: str, body: bytes, sent: Any) -> Reply:
        """Send a body, check the answer and the log lines it added."""
        started = time.monotonic()
        reply = send(self.server, path, body)
        self.slowest = sorted([*self.slowest, (time.monotonic() - started, path, body[:200])])[-10:]
        self.requests += 1
        check_reply(reply, sent, path)
        if isinstance(sent, dict) and not set(sent) <= self.fields[path]:  # what the document does not name is refused
            assert 400 <= reply.status < 500, (reply, set(sent) - self.fields[path])
        self.check_log()
        return reply

    def check_log(self) -> None:
        """The log's new lines: no traceback, no internal error, each an access line or aigc's own."""
        text = self.server.log.read_text(errors="replace")
        end = text.rfind("\n") + 1  # whole lines only: the server may be writing one
        new, self.seen = text[self.seen : end], max(self.seen, end)
        assert "Traceback" not in new and "internal error" not in new, new[-3000:]
        for line in new.splitlines():
            assert line.startswith(("127.0.0.1 ", "aigc serve: ")), line


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    f = Fuzzed(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.side.stop()
    f.server.stop()


# -- schemathesis on the server's OpenAPI document ----------------------------------------------


def _openapi(server: Server) -> dict[str, Any]:
    """The server's document, with what it cannot know from the registry pinned for the fuzzer:
    the one model name it serves, and token ids below the model's vocabulary."""
    status, _, data = server.raw("GET", "/openapi.json")
    assert status == 200
    doc = json.loads(data)

    def pin(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and isinstance(props.get("model"), dict):
                props["model"] = {**props["model"], "enum": [MODEL]}
            if node.get("type") == "integer" and node.get("minimum") == 0 and "maximum" not in node:
                node["maximum"] = VOCAB - 1
            for v in node.values():
                pin(v)
        elif isinstance(node, list):
            for v in node:
                pin(v)

    pin(doc["components"]["schemas"])
    return doc


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE])
def test_schemathesis(fuzzed, path, mode, scale):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core import NOT_SET

    schema = schemathesis.openapi.from_dict(_openapi(fuzzed.server))
    operation = schema[path]["POST"]

    @settings(FUZZ, max_examples=60 * scale)
    @given(operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Any) -> None:
        body = case.body
        if body is NOT_SET:
            raw, body = b"", None
        elif isinstance(body, (bytes, bytearray)):
            raw, body = bytes(body), None
        else:
            raw = dump(body).encode()
        fuzzed.post(path, raw, body)

    run()


# -- hypothesis: valid and hostile values mixed -------------------------------------------------

SURROGATES = st.sampled_from(["\udfff", "\ud800", "\udc80", "\udbff\udbff"])
BAD_TEXT = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), SURROGATES, st.text(max_size=4))
LONG_TEXT = st.sampled_from(["x" * 2000, "ab " * 40_000, "x" * 200_000])  # over the context in tokens, in characters
TEXTS = st.one_of(st.text(max_size=8), BAD_TEXT, st.sampled_from(["", " ", "\x00", "\u2028", "<|endoftext|>", "{{ 7*7 }}"]), LONG_TEXT)
LONG_IDS = st.sampled_from([[1] * 1025, [1] * 300_000, list(range(VOCAB)) * 20])
IDS = st.one_of(st.lists(st.integers(-2, VOCAB + 2), max_size=20), LONG_IDS, st.sampled_from([[10**400], [True], [1.0], [[1]]]))
HOSTILE = st.one_of(
    BAD_TEXT,
    st.sampled_from([10**400, -(10**400), -1, -(2**63), 2**64, 1e308, -1e-308, 0, True, False, None]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    TEXTS,
    st.sampled_from([[], {}, [[]], [None], [1.5], ["a", 1], {"a": 1}, [True], [10**400], [-1]]),
    st.integers(1, 5000).map(lambda depth: Deep("[" * depth + "]" * depth)),
    st.integers(1, 5000).map(lambda depth: Deep('{"a": ' * depth + "1" + "}" * depth)),
    st.sampled_from([Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("-0"), Raw("1" * 400), Raw('"\\udfff"'), Raw('"\\ud800\\u0041"')]),
    IDS,
    st.sampled_from([[[1, 2]] * 2000, ["x"] * 5000]),
)
SANE = st.one_of(st.integers(-3, 40), st.sampled_from([1000, 1024, 1025, 5000]), st.floats(-2, 3, allow_nan=False), st.booleans(),
                 st.text(max_size=8), st.none())
SPECIFIC = {  # values near what a field takes: the edges of its own kind
    "prompt": st.one_of(TEXTS, IDS, st.lists(st.one_of(TEXTS, IDS), max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": TEXTS, "content": TEXTS}), max_size=3),
    "tokens": IDS,
    "stop": st.one_of(TEXTS, st.lists(TEXTS, max_size=20)),
    "ban": st.one_of(TEXTS, st.lists(TEXTS, max_size=3)),
    "stop_token_ids": IDS,
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "continuous_usage_stats", "x"]), SANE),
}
FIELDS_OF = {
    COMPLETIONS: ["model", "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "n", "best_of",
                  "stop", "stop_token_ids", "ban", "seed", "logprobs", "echo", "stream", "stream_options", "decoding", "num_beams",
                  "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "early_stopping", "penalty_alpha", "user", "suffix",
                  "presence_penalty", "frequency_penalty", "logit_bias", "record_id", "indices", "ignore_eos", "return_token_ids"],
    CHAT: ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "n", "stop", "seed", "stream", "logprobs",
           "top_logprobs", "tools", "tool_choice", "response_format", "parallel_tool_calls", "decoding", "ban", "user"],
    TOKENIZE: ["model", "prompt", "add_special_tokens", "return_token_strs"],
    DETOKENIZE: ["model", "tokens"],
}
OTHERS = sorted({k for keys in FIELDS_OF.values() for k in keys} | {"messages", "tokens", "add_special_tokens"})
UNKNOWN_KEYS = st.one_of(st.text(min_size=1, max_size=12), st.builds(lambda s: "key" + s, SURROGATES), st.just("x" * 5000),
                         st.sampled_from(OTHERS))  # a sibling endpoint's field is unknown here


@st.composite
def hostile_bodies(draw: Any, path: str) -> tuple[dict[str, Any], str | None]:
    """A valid body (its optional fields kept or not) with some fields set to hostile, ordinary or
    edge values of their kind, and now and then a key the endpoint does not take; (the body, the
    one field made hostile when it is the only change)."""
    body = {k: v for k, v in BASE[path].items() if k in REQUIRED[path] or draw(st.booleans())}
    keys = draw(st.lists(st.sampled_from(FIELDS_OF[path]), min_size=1, max_size=4, unique=True))
    primary = REQUIRED[path][-1]  # the prompt, the messages, the tokens: half the time among the changes
    keys = [primary, *(k for k in keys if k != primary)][:4] if draw(st.booleans()) else keys
    hostile = []
    for key in keys:
        kind = draw(st.sampled_from(["hostile", "sane", "specific"]))
        body[key] = draw(HOSTILE if kind == "hostile" else SPECIFIC.get(key, SANE) if kind == "specific" else SANE)
        hostile += [key] if kind == "hostile" else []
    unknown = draw(st.integers(0, 2)) == 0
    if unknown:
        body[draw(UNKNOWN_KEYS)] = draw(st.one_of(SANE, HOSTILE))
    order = draw(st.permutations(list(body)))
    return {k: body[k] for k in order}, hostile[0] if len(hostile) == 1 and len(keys) == 1 and not unknown else None


def _strictly_wrong(value: Any) -> bool:
    """A value no field takes: invalid text, NaN, Infinity, a number past a float's range."""
    if isinstance(value, Raw):
        return not isinstance(value, Deep) and value in ("NaN", "-Infinity", "1e999", '"\\udfff"')
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    return isinstance(value, float) and not math.isfinite(value)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE])
def test_hostile_values(fuzzed, path, scale):
    @settings(FUZZ, max_examples=(100 if path in (COMPLETIONS, CHAT) else 50) * scale)
    @given(hostile_bodies(path))
    def run(drawn: tuple[dict[str, Any], str | None]) -> None:
        body, culprit = drawn
        raw = dump(body).encode()
        note(f"body: {raw[:1000]!r}")
        reply = fuzzed.post(path, raw, body)
        wrong = [k for k, v in body.items() if _strictly_wrong(v)]
        if wrong and reply.status != 413:  # a value no field takes is never let through
            assert 400 <= reply.status < 500, (reply, wrong)
        if culprit is not None and culprit in wrong and reply.status != 413:
            assert reply.status == 400, (reply, culprit)
            assert json.loads(reply.data)["error"]["param"] == culprit, (reply.data[:500], culprit)

    run()


WRONG = (Raw("NaN"), Raw("-Infinity"), Raw("1e999"), "\udfff", "ok\ud800", [], {"a": [1]})  # what no field takes (the last two: by type)
FULL = {  # every endpoint's body with its optional fields set, so that none goes unread
    COMPLETIONS: {**BASE[COMPLETIONS], "n": 1, "stream": False},
    CHAT: {**BASE[CHAT], "n": 1, "stream": False},
    TOKENIZE: {**BASE[TOKENIZE], "model": MODEL, "add_special_tokens": True},
    DETOKENIZE: {**BASE[DETOKENIZE], "model": MODEL},
}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE])
def test_every_field_of_the_document_refuses_what_no_field_takes(fuzzed, path):
    """Field by field of the OpenAPI document: a value no field takes is a 400 naming that field
    (whatever else the body holds), and a field of another endpoint is a 400 naming it."""
    fields = sorted(fuzzed.fields[path])
    for field in fields:
        for value in WRONG:
            if isinstance(value, (list, dict)) and field in ("stop", "ban", "stop_token_ids", "indices", "logit_bias", "stream_options",
                                                              "prompt", "messages", "tokens"):
                continue  # a list or an object is that field's kind
            body = {**FULL[path], field: value}
            reply = fuzzed.post(path, dump(body).encode(), body)
            assert reply.status == 400 and json.loads(reply.data)["error"]["param"] == field, (field, value, reply)
    for field in sorted(set(OTHERS) - set(fields)):
        body = {**FULL[path], field: 1}
        reply = fuzzed.post(path, dump(body).encode(), body)
        assert reply.status == 400 and json.loads(reply.data)["error"]["param"] == field, (field, reply)


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"}", b"null", b"[]", b"1", b'"x"', b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{\"a\":1,}", b"{'a': 1}",
                     b'{"model": "\xff"}', b'{"prompt": "\xed\xa0\x80"}', b"NaN", b"{" * 100_000, b"[" * 100_000 + b"]" * 100_000,
                     b'{"prompt": "' + b"x" * 5_000_000 + b'"}', b'{"prompt": "a", "prompt": 1}', b"\x00" * 70_000]),
    st.integers(1, 20_000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
    st.integers(60_000, 80_000).map(lambda size: b'{"prompt": "' + b"x" * size + b'", "model": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, TOKENIZE, DETOKENIZE])
def test_raw_bytes(fuzzed, path, scale):
    @settings(FUZZ, max_examples=25 * scale)
    @given(RAW_BODIES)
    def run(raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        fuzzed.post(path, raw, body)

    run()


# -- the defects the fuzzing found, and classics, by hand ---------------------------------------

CHAT_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
CASES = [
    # (path, body as JSON text or an object, status, param); first the defects the fuzzing found:
    # an unknown key was named repr-escaped and cut with '..' (completions) or not at all (tokenizer)
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "0\x1f\U00012544": 1}, 400, "0\x1f\U00012544"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "k" * 300: 1}, 400, "k" * 197 + "..."),
    (TOKENIZE, '{"prompt": "x", "surprise": 1}', 400, "surprise"),
    (DETOKENIZE, {"tokens": [1], "x\udfff": 1}, 400, "x\udfff"),
    # the tokenizer's endpoints answered 404 "no such model" to a model name that is not text
    (TOKENIZE, {"prompt": "x", "model": "\udfff"}, 400, "model"),
    (DETOKENIZE, {"tokens": [1], "model": 5}, 400, "model"),
    # chat: max_completion_tokens went unchecked beside max_tokens; top_logprobs, logprobs and
    # parallel_tool_calls of any type were dropped unread
    (CHAT, {**CHAT_BASE, "max_tokens": 3, "max_completion_tokens": Raw("NaN")}, 400, "max_completion_tokens"),
    (CHAT, {**CHAT_BASE, "max_tokens": 3, "max_completion_tokens": "\udfff"}, 400, "max_completion_tokens"),
    (CHAT, {**CHAT_BASE, "max_tokens": 3, "max_completion_tokens": 4}, 400, "max_completion_tokens"),
    (CHAT, {**CHAT_BASE, "top_logprobs": Raw("NaN")}, 400, "top_logprobs"),
    (CHAT, {**CHAT_BASE, "logprobs": "\udfff"}, 400, "logprobs"),
    (CHAT, {**CHAT_BASE, "parallel_tool_calls": 10**400}, 400, "parallel_tool_calls"),
    # chat took completion fields its document leaves out: prompt (then overwritten), echo (applied)
    (CHAT, {**CHAT_BASE, "echo": True}, 400, "echo"),
    (CHAT, {**CHAT_BASE, "prompt": "x"}, 400, "prompt"),
    (CHAT, {**CHAT_BASE, "best_of": 2}, 400, "best_of"),
    # chat's refusals named the completion's fields: 'prompt' for the messages, 'max_tokens'
    (CHAT, {**CHAT_BASE, "messages": [{"role": "user", "content": "x" * 100_000}]}, 400, "messages"),
    (CHAT, {**CHAT_BASE, "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    # a request over the server's capacity was named n whatever made it so (the long variant found it on chat)
    (CHAT, {**CHAT_BASE, "num_beams": 25}, 400, "num_beams"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "num_beams": 25}, 400, "num_beams"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "decoding": "contrastive", "top_k": 25, "penalty_alpha": 0.5}, 400, "top_k"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["x"] * 25}, 400, "prompt"),
    (CHAT, {**CHAT_BASE, "n": 25}, 400, "n"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 2, "best_of": 25}, 400, "best_of"),
    # and classics
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": Raw("NaN")}, 400, "temperature"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": Raw("1e999")}, 400, "top_p"),
    (COMPLETIONS, {"model": MODEL, "prompt": Deep("[" * 5000 + "]" * 5000)}, 400, None),
    (COMPLETIONS, {"model": MODEL, "prompt": [1] * 1_000_000}, 400, "prompt"),
    (DETOKENIZE, {"tokens": [10**400]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", CASES)
def test_found_by_fuzzing(fuzzed, path, body, status, param):
    raw = body.encode() if isinstance(body, str) else dump(body).encode()
    reply = fuzzed.post(path, raw, json.loads(raw) if isinstance(body, str) else body)
    assert reply.status == status, reply
    assert json.loads(reply.data)["error"]["param"] == param, reply.data


# -- at the end: the streams beside it all ------------------------------------------------------


def test_side_streams_were_undisturbed_and_the_log_is_clean(fuzzed):
    runs = fuzzed.side.stop()
    print("requests", fuzzed.requests, "runs", {p: len(r) for p, r in runs.items()})
    for x in fuzzed.slowest:
        print(x)
    for prompt, alone in fuzzed.side.alone.items():
        assert runs[prompt], f"no side stream of {prompt!r} ran during the fuzzing"
        for k, run in enumerate(runs[prompt]):
            if run != alone:
                a, b = json.loads(alone), json.loads(run)
                diff = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                raise AssertionError(f"side stream {prompt!r}, run {k}, differs from its run alone: event {diff}: {a[diff]} {b[diff]}")
    fuzzed.check_log()
