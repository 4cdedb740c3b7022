"""aigc serve speaks the completions protocol to the token, as evaluation harnesses read it, and
no client can break it: every mistake is a 4xx naming the field, load control counts all work,
logs are safe, SIGTERM drains."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest
import torch

from tests.serving import KEY, Server, sse_events

EOS = 256  # tiny-random's <|endoftext|> (eos_dir, in conftest.py, makes it likely)


@pytest.fixture(scope="module")
def eos_engine(eos_dir):
    from aigc_cli.engine.engine import Engine

    return Engine.load(str(eos_dir))


@pytest.fixture(scope="module")
def eos_prompt(eos_engine) -> str:
    """A prompt after which the greedy next token is end-of-text."""
    import random

    from aigc_cli.models.tiny import WORDS

    rng = random.Random(0)
    model, tok = eos_engine.lm.model, eos_engine.tokenizer
    for _ in range(5000):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        ids = torch.tensor([tok.encode(prompt)])
        hidden = model.forward(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))
        if int(model.logits(hidden[0, -1]).argmax()) == EOS:
            return prompt
    raise AssertionError("no prompt is followed by end-of-text")


@pytest.fixture(scope="module")
def server(eos_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("proto"), "--batch-size", "4", "--max-queue", "4", model=str(eos_dir))
    yield s
    assert s.stop() == 0, s.log.read_text()


def _post(server, body, path="/v1/completions"):
    status, headers, data = server.raw("POST", path, body)
    return status, json.loads(data) if data.startswith(b"{") else data


def _scored(engine, ids: list[int], top: int = 1):
    from aigc_cli.engine.scoring import prompt_logprobs

    return prompt_logprobs(engine.lm.model, ids, top)


# -- end-of-text is a token of the completion ------------------------------------------------------


def test_a_generated_end_of_text_is_a_token_of_the_completion(server, eos_engine, eos_prompt):
    status, r = _post(server, {"model": str(server.model), "prompt": eos_prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2,
                               "return_token_ids": True})
    assert status == 200, r
    (choice,) = r["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<|endoftext|>"] and lp["text_offset"] == [0] and choice["token_ids"] == [EOS]
    ids = eos_engine.tokenizer.encode(eos_prompt)
    expected = _scored(eos_engine, ids + [EOS], 2)[-1]
    assert lp["token_logprobs"][0] == pytest.approx(expected[0], abs=1e-4)
    assert "<|endoftext|>" in lp["top_logprobs"][0] and len(lp["top_logprobs"][0]) <= 3
    assert r["usage"]["completion_tokens"] == 1


def test_lm_eval_loglikelihood_reads_the_continuation_even_when_end_of_text_follows(server, eos_engine, eos_prompt):
    """lm-eval sends context + continuation with echo, logprobs 1 and max_tokens 1, and reads
    token_logprobs[ctxlen:-1]: the last entry must be the one generated token, end-of-text too."""
    context, continuation = eos_prompt.rsplit(" ", 1)
    ids = eos_engine.tokenizer.encode(eos_prompt)
    ctxlen = len(eos_engine.tokenizer.encode(context))
    for stream in (False, True):
        body = {"model": str(server.model), "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "stream": stream}
        status, r = _post(server, body)
        assert status == 200
        if stream:
            events = sse_events(r)
            assert events[-1] == "[DONE]"
            lp = {"token_logprobs": [x for e in events[:-1] for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]}
            lp["top_logprobs"] = [x for e in events[:-1] for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["top_logprobs"]]
            finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
            assert finishes[-1] == "stop" and finishes.count(None) == len(finishes) - 1
        else:
            lp = r["choices"][0]["logprobs"]
            assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        reference = _scored(eos_engine, ids)
        assert lp["token_logprobs"][ctxlen:-1] == pytest.approx([x[0] for x in reference[ctxlen:]], abs=1e-4)
        tops = lp["top_logprobs"][ctxlen:-1]
        assert all(len(t) <= 2 for t in tops)  # the most likely and the prompt's own token


def test_scoring_only_ends_with_finish_reason_length_and_a_full_context_fits(server, eos_engine):
    ids = [eos_engine.tokenizer.encode(" the sea")[0]] * 1024  # exactly the context
    body = {"model": str(server.model), "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    status, r = _post(server, body)
    assert status == 200, r
    assert r["choices"][0]["finish_reason"] == "length" and len(r["choices"][0]["logprobs"]["token_logprobs"]) == 1024
    assert r["usage"]["completion_tokens"] == 0
    status, r = _post(server, {**body, "stream": True})
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    status, r = _post(server, {**body, "max_tokens": 1})
    assert status == 400 and r["error"]["param"] == "max_tokens" and "--" not in r["error"]["message"], r


def test_echo_stream_and_logprobs_together(server, eos_engine):
    body = {"model": str(server.model), "prompt": "the sea at night", "max_tokens": 6, "echo": True, "logprobs": 1, "seed": 4}
    status, whole = _post(server, body)
    status, streamed = _post(server, {**body, "stream": True})
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    tokens = [t for e in events[:-1] for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert text == whole["choices"][0]["text"] and text.startswith("the sea at night")
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]


# -- the tokenizer endpoints ------------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(server, eos_engine):
    status, r = _post(server, {"prompt": "Hello, world", "return_token_strs": True}, "/tokenize")
    assert status == 200 and r["tokens"] == eos_engine.tokenizer.encode("Hello, world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024 and len(r["token_strs"]) == r["count"]
    status, d = _post(server, {"tokens": r["tokens"]}, "/detokenize")
    assert status == 200 and d == {"prompt": "Hello, world"}
    status, _, data = server.raw("GET", "/tokenizer_info")
    info = json.loads(data)
    assert status == 200 and info["eos_token_id"] == EOS and info["model_max_length"] == 1024 and info["vocab_size"] == len(eos_engine.tokenizer)
    for path, body, param in (
        ("/tokenize", {"prompt": "x\udfffy"}, "prompt"),
        ("/tokenize", {"prompt": "x" * (1 << 20 + 1)}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/detokenize", {"tokens": [1, 10**400]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ):
        status, r = _post(server, body, path)
        assert status == 400 and r["error"]["param"] == param, (path, r)
    status, r = _post(server, {"prompt": "x", "surprise": 1}, "/tokenize")
    assert status == 400 and "unknown parameter" in r["error"]["message"]


# -- every client mistake is a 4xx naming the field ------------------------------------------------

HUGE = 10**400


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"prompt": "bad \udfff surrogate"}, "prompt"),
        ({"prompt": ["fine", "bad \ud800"]}, "prompt"),
        ({"ban": ["ok\udfff"]}, "ban"),
        ({"stop": "\ud800"}, "stop"),
        ({"user": "\udfff"}, "user"),
        ({"model": "\udfff"}, "model"),
        ({"surprise\udfff": 1}, None),
        ({"temperature": HUGE}, "temperature"),
        ({"top_p": HUGE}, "top_p"),
        ({"min_p": -HUGE}, "min_p"),
        ({"typical_p": HUGE}, "typical_p"),
        ({"repetition_penalty": HUGE}, "repetition_penalty"),
        ({"length_penalty": HUGE}, "length_penalty"),
        ({"n": HUGE}, "n"),
        ({"max_tokens": HUGE}, "max_tokens"),
        ({"seed": HUGE}, "seed"),
        ({"logprobs": HUGE}, "logprobs"),
        ({"best_of": HUGE}, "best_of"),
        ({"typical_p": 0}, "typical_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": "x" * 1001}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 1.5}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"prompt": [[1, 2], "x", 3]}, "prompt"),
        ({"prompt": [10**30]}, "prompt"),
    ],
)
def test_every_mistake_is_a_400_naming_the_field(server, extra, param):
    body = {"model": str(server.model), "prompt": "Hello", "max_tokens": 2, **extra}
    raw = json.dumps(body, ensure_ascii=True).encode()
    status, headers, data = server.raw("POST", "/v1/completions", raw, {"Content-Type": "application/json"})
    err = json.loads(data)["error"]
    assert status in (400, 404) and err["type"] == "invalid_request_error", (status, err)
    if param is not None:
        assert err["param"] == param, err
    assert "--" not in err["message"], err  # named as a request field, never as a CLI flag


def test_the_openapi_document_is_the_registrys(server):
    from aigc_cli.core.settings import REGISTRY

    status, _, data = server.raw("GET", "/openapi.json")
    doc = json.loads(data)
    body = doc["components"]["schemas"]["CompletionRequest"]
    assert status == 200 and "/v1/completions" in doc["paths"]
    for setting in REGISTRY:
        assert setting.param in body["properties"], setting.param
    top_p = body["properties"]["top_p"]
    assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0, 1)
    assert body["properties"]["max_tokens"]["default"] == 16 and body["additionalProperties"] is False


# -- load control ------------------------------------------------------------------------------------


def test_the_queue_counts_every_kind_of_work_at_all_times(server):
    """--batch-size 4 --max-queue 4: eight sequences at once, however the work is made up."""
    status, r = _post(server, {"model": str(server.model), "prompt": ["a"] * 3, "n": 3, "max_tokens": 2})  # 9 sequences, idle server
    assert status == 400 and r["error"]["code"] == "too_many_sequences"
    status, r = _post(server, {"model": str(server.model), "prompt": ["a"] * 9, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 400, r  # nine prompts to score
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    long = {"model": str(server.model), "prompt": "Hello", "max_tokens": 600, "min_tokens": 600, "n": 4, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(long), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    response.readline()
    beam = {"model": str(server.model), "prompt": "Hello", "max_tokens": 2, "decoding": "beam", "num_beams": 5}
    status, r = _post(server, beam)  # five beams do not fit beside four running sequences
    assert status == 503 and r["error"]["code"] == "queue_full", r
    conn.close()  # the client goes away: its sequences stop at the next step
    deadline = time.monotonic() + 30
    while (status := _post(server, beam)[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


# -- logs ---------------------------------------------------------------------------------------------


def test_log_lines_cannot_be_forged_and_disconnects_are_quiet(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /nowhere%0a127.0.0.1%20%22GET%20/forged%22%20200%1b[2J HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1000)
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # an upload dropped half-way
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n{\"mo")
    time.sleep(0.5)
    log = server.log.read_text()
    assert "\x1b" not in log and "Traceback" not in log
    assert not any(line.startswith('127.0.0.1 "GET /forged"') for line in log.splitlines())
    assert "/nowhere\\n127.0.0.1" in log
    assert '"POST /v1/completions" 499' in log


# -- shutdown --------------------------------------------------------------------------------------


def test_sigterm_drains_then_ends_what_is_left_with_an_error_the_client_sees(eos_dir, tmp_path):
    s = Server(tmp_path, "--shutdown-timeout", "1", "--batch-size", "2", model=str(eos_dir))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        body = {"model": str(eos_dir), "prompt": "Hello", "max_tokens": 1000, "min_tokens": 1000, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        stream = conn.getresponse()
        stream.readline()
        whole: dict = {}

        def plain() -> None:  # a non-streamed request in flight
            whole["r"] = s.raw("POST", "/v1/completions", {**body, "stream": False})

        t = threading.Thread(target=plain)
        t.start()
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, _, health = s.raw("GET", "/health")
        assert status == 503 and json.loads(health)["status"] == "draining"
        status, _, refused = s.raw("POST", "/v1/completions", {"model": str(eos_dir), "prompt": "x", "max_tokens": 1})
        assert status == 503
        events = sse_events(stream.read())
        assert events and "error" in events[-1] and events[-1]["error"]["code"] == "shutting_down"
        t.join(30)
        assert whole["r"][0] == 503 and json.loads(whole["r"][2])["error"]["code"] == "shutting_down"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
