"""aigc serve: the OpenAI API through the official `openai` SDK, against a server in a subprocess
on a free loopback port, checked against the engine in this process; and the CLI as its client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from tests.serving import KEY, MODEL, Server

TEMPLATE = "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    s = Server(tmp, "--metrics", "--chat-template", str(tmp / "chat.jinja"))
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def engine():
    from aigc_cli.engine.engine import Engine

    return Engine.load(MODEL)


def local(engine, prompt: str, seed: int, n: int = 1, prompt_id=0, **settings):
    """What the engine in this process generates for the server's defaults (no top-k)."""
    from aigc_cli.engine.engine import Request
    from aigc_cli.core.settings import GenerationSettings

    s = GenerationSettings(num_sequences=n, top_k=settings.pop("top_k", 0), seed=seed, **settings).resolved()
    return [c.text for c in engine.generate([Request(prompt_id, prompt, s, seed)])]


# -- the OpenAI SDK ------------------------------------------------------------------------------


def test_completion_equals_the_engine_and_streams_the_same_text(server, engine):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, seed=5)
    assert r.object == "text_completion" and r.model == MODEL and r.id
    assert [c.text for c in r.choices] == local(engine, "Hello there", 5, max_new_tokens=12)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("Hello there")) and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, seed=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_with_a_template_continues_the_rendered_conversation(server):
    from jinja2 import Template

    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=4)
    prompt = Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, seed=4)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=4, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason is not None for c in chunks].count(True) == 1


def test_n_and_seeds(server, engine):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert texts == local(engine, "Once upon a time", 7, n=3, max_new_tokens=10)
    assert len(set(texts)) == 3
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=7)
    assert [c.text for c in again.choices] == texts
    other = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=8)
    assert [c.text for c in other.choices] != texts

    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=3, seed=7, stream=True))
    for i in range(3):
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == texts[i]
        assert sum(c.finish_reason is not None for c in mine) == 1

    # a list of prompts: choice p*n + i, each prompt as `aigc generate` numbers it
    r = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=6, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices[2:]] == local(engine, "Goodbye", 3, n=2, prompt_id=1, max_new_tokens=6)


def test_stop_strings_are_never_streamed_in_part(server, engine):
    client = server.client()
    base = client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0, logprobs=0)
    text, tokens = base.choices[0].text, base.choices[0].logprobs.tokens
    # a stop string that starts inside the third token and ends in the fourth: the text after the
    # third token ends with the stop string's first part, which must be held back
    k = next(k for k in range(2, len(tokens) - 1) if len(tokens[k]) >= 2 and tokens[k + 1])
    stop = tokens[k][-2:] + tokens[k + 1][:1]
    cut = text.index(stop)
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:cut]  # nothing of the stop string went out
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(server, engine):
    """The chosen tokens' log-probabilities equal a whole-sequence forward pass over prompt + text."""
    from aigc_cli.engine.scoring import prompt_logprobs

    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, seed=2, logprobs=3, extra_body={"return_token_ids": True})
    lp = r.choices[0].logprobs
    prompt = engine.tokenizer.encode("Hello there")
    ids = prompt + r.choices[0].model_extra["token_ids"]
    reference = prompt_logprobs(engine.lm.model, ids, 3)[len(prompt) :]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for token, got, ref, top in zip(lp.tokens, lp.token_logprobs, reference, lp.top_logprobs):
        assert got == pytest.approx(ref[0], abs=1e-4)
        assert len(top) <= 3 + 1 and top[token] == got  # the 3 most likely, and the chosen one (as vLLM and OpenAI)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0

    echoed = client.completions.create(model=MODEL, prompt="Hello there friend", max_tokens=0, echo=True, logprobs=1)
    e = echoed.choices[0]
    assert e.text == "Hello there friend"
    ref = prompt_logprobs(engine.lm.model, engine.tokenizer.encode("Hello there friend"), 1)
    assert e.logprobs.token_logprobs[0] is None and len(e.logprobs.tokens) == len(ref)
    assert e.logprobs.token_logprobs[1:] == pytest.approx([x[0] for x in ref[1:]], abs=1e-4)

    both = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, seed=2, echo=True)
    assert both.choices[0].text.startswith("Hello") and len(both.choices[0].text) > 5


def test_best_of_keeps_the_highest_mean_logprob(server):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, seed=4, n=1, best_of=4, logprobs=0)
    every = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, seed=4, n=4, logprobs=0)

    def mean(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    best = max(every.choices, key=mean)
    assert r.choices[0].text == best.text


def test_concurrent_requests_equal_their_results_alone(server):
    client = server.client()
    asks = [
        dict(prompt=f"Prompt number {i} says", max_tokens=5 + i % 7, seed=i, **({"temperature": 0} if i % 3 == 0 else {"top_p": 0.9}))
        for i in range(16)
    ]
    alone = [client.completions.create(model=MODEL, **a).choices[0].text for a in asks]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: client.completions.create(model=MODEL, **a).choices[0].text, asks))
    assert together == alone


def test_beam_and_contrastive_requests(server, engine):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, extra_body={"decoding": "beam", "num_beams": 3})
    assert [c.text for c in r.choices] == local(engine, "Hello", 0, n=2, max_new_tokens=6, decoding="beam", num_beams=3, top_k=None)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, extra_body={"decoding": "contrastive", "penalty_alpha": 0.6})
    assert [c.text for c in r.choices] == local(engine, "Hello", 0, max_new_tokens=6, decoding="contrastive", top_k=None)
    # contrastive rows run on the scheduler: they stream token by token, with logprobs
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=6, stream=True, logprobs=1, extra_body={"decoding": "contrastive", "penalty_alpha": 0.6}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1
    assert all(c.choices[0].logprobs.token_logprobs[0] <= 0 for c in chunks if c.choices and c.choices[0].text)


def test_a_client_that_goes_away_mid_stream_frees_its_rows(server):
    before = _metric(server, "aigc_generated_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1000, "n": 4, "stream": True, "min_tokens": 1000}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event
    assert _metric(server, "aigc_sequences_running") == 4
    conn.close()
    deadline = time.monotonic() + 30
    while _metric(server, "aigc_sequences_running") != 0:
        assert time.monotonic() < deadline, "the rows kept running after the client left"
        time.sleep(0.02)
    assert _metric(server, "aigc_sequences_waiting") == 0
    generated = _metric(server, "aigc_generated_tokens_total") - before
    assert generated < 3000, f"{generated} of the 4,000 tokens were generated after all"
    r = server.client().completions.create(model=MODEL, prompt="Still there?", max_tokens=3)
    assert r.choices[0].text


def _metric(server: Server, name: str) -> float:
    status, _, text = server.raw("GET", "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- errors --------------------------------------------------------------------------------------


def _error(server: Server, body, path="/v1/completions", headers=None):
    status, _, data = server.raw("POST", path, body, headers)
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return status, err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 2}, "top_p"),
        ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ({"model": MODEL, "prompt": "x", "temperature": 0, "n": 2}, "temperature"),
        ({"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "best_of": 2, "n": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
        ({"model": MODEL, "prompt": "x", "wat": 1}, "wat"),
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_client_mistakes_are_400_naming_the_parameter(server, body, param):
    status, err = _error(server, body)
    assert status == 400 and err["param"] == param and err["type"] == "invalid_request_error"


def test_tokenize_gives_the_engines_tokens(server, engine):
    text = "Hello there, friend " * 50
    status, _, data = server.raw("POST", "/tokenize", {"model": MODEL, "prompt": text})
    body = json.loads(data)
    assert status == 200 and body["tokens"] == engine.tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.context_length


def test_other_refusals(server, engine):
    status, err = _error(server, b"{not json")
    assert status == 400
    status, err = _error(server, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")  # too deep for the parser
    assert status == 400 and "nested too deeply" in err["message"]
    long = "word " * 1020
    count = len(engine.tokenizer.encode(long))
    status, err = _error(server, {"model": MODEL, "prompt": long, "max_tokens": 16})
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and f"{count} tokens" in err["message"] and "'max_tokens' is 16" in err["message"], err
    huge = "a" * (engine.context_length * engine.longest_token + 1)  # refused before it is tokenized
    status, err = _error(server, {"model": MODEL, "prompt": huge, "max_tokens": 16})
    assert status == 400 and err["code"] == "context_length_exceeded" and "characters" in err["message"], err
    status, err = _error(server, {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    status, err = _error(server, {"model": MODEL, "prompt": "x"}, path="/v1/nowhere")
    assert status == 404
    status, err = _error(server, b"x" * (5 << 20))
    assert status == 413
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model=MODEL, prompt="x")
    status, err = _error(server, {"model": MODEL, "prompt": "x"}, headers={"Authorization": ""})
    assert status == 401 and err["code"] == "invalid_api_key"
    status, _, body = server.raw("GET", "/health", headers={"Authorization": ""})
    assert status == 200
    models = server.client().models.list()
    assert models.data[0].id == MODEL and models.data[0].model_extra["max_model_len"] == 1024


def test_a_full_queue_is_503_with_retry_after_and_sigterm_exits_0(tmp_path):
    s = Server(tmp_path, "--batch-size", "1", "--max-queue", "0", key=None)
    try:
        status, _, data = s.raw("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and "no chat format" in json.loads(data)["error"]["message"]  # no --chat-template
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "min_tokens": 100, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body))
        response = conn.getresponse()
        response.readline()
        status, headers, data = s.raw("POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 503 and headers.get("retry-after") == "1"
        assert json.loads(data)["error"]["code"] == "queue_full"
        s.proc.send_signal(signal.SIGTERM)  # the stream in flight finishes, then the server exits 0
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert s.proc.wait(timeout=30) == 0
        assert "POST /v1/completions\" 503" in s.log.read_text()
    finally:
        s.stop()


def test_a_model_that_cannot_load_stops_the_server_with_exit_3(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "aigc_cli", "serve", "--model", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_the_extra_names_it(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    result = cli("serve", "--model", MODEL)
    assert result.exit_code == 2
    assert 'pip install "aigc[serve]"' in result.stderr


# -- the CLI as a client -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["Hello there", "--seed", "3", "-n", "2", "--max-new-tokens", "8"],
        ["Hello there", "Bye", "--seed", "3", "-n", "2", "--max-new-tokens", "8", "--format", "jsonl"],
        ["Hi", "--decoding", "beam", "-n", "2", "--max-new-tokens", "6"],
        ["Hi", "--stop", "e", "--max-new-tokens", "20", "--seed", "1", "--format", "jsonl"],
        ["Hi", "--temperature", "0", "--max-new-tokens", "5", "--format", "plain"],
    ],
)
def test_the_cli_client_prints_what_a_local_run_prints(server, cli, args):
    remote = cli("generate", *args, env={"AIGC_SERVER": server.url, "AIGC_API_KEY": KEY})
    here = cli("generate", *args, "--model", MODEL)
    assert remote.exit_code == here.exit_code == 0, remote.stderr
    assert remote.stdout == here.stdout


def test_the_cli_client_writes_and_resumes_the_same_file(server, cli, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"id": f"r{i}", "prompt": f"Record {i} begins", **({"max_new_tokens": 3 + i} if i % 2 else {})} for i in range(9)]
    lines.insert(4, {"id": "bad", "prompt": ""})
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = {"AIGC_SERVER": server.url, "AIGC_API_KEY": KEY}
    local_out, remote_out = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    here = cli("generate", "-f", str(src), "-o", str(local_out), "--seed", "9", "-n", "2", "--model", MODEL)
    remote = cli("generate", "-f", str(src), "-o", str(remote_out), "--seed", "9", "-n", "2", env=env)
    assert here.exit_code == remote.exit_code == 4, remote.stderr  # the empty prompt's error record
    assert remote_out.read_text() == local_out.read_text()

    full = remote_out.read_text()
    remote_out.write_text("".join(full.splitlines(keepends=True)[:7]))
    resumed = cli("generate", "-f", str(src), "-o", str(remote_out), "--resume", "-n", "2", env=env)
    assert resumed.exit_code == 4
    assert sorted(remote_out.read_text().splitlines()) == sorted(full.splitlines())


def test_the_cli_client_fails_fast_and_clearly(cli, server):
    dead = cli("generate", "Hi", "--server", "http://127.0.0.1:9", "--max-new-tokens", "2")
    assert dead.exit_code == 3 and "cannot reach the server" in dead.stderr
    wrong = cli("generate", "Hi", "--server", server.url, "--api-key", "nope")
    assert wrong.exit_code == 2 and "--api-key" in wrong.stderr
    other = cli("generate", "Hi", "--server", server.url, "--api-key", KEY, "--model", "gpt2-xl")
    assert other.exit_code == 2 and "tiny-random" in other.stderr
    flags = cli("generate", "Hi", "--server", server.url, "--device", "cpu")
    assert flags.exit_code == 2 and "--device" in flags.stderr


def test_the_cli_client_does_not_import_torch(server, tmp_path):
    code = (
        "import sys; from aigc_cli.frontends.cli.app import main; sys.argv = ['aigc', 'generate', 'Hi', '--max-new-tokens', '3'];\n"
        "import atexit, os\n"
        "atexit.register(lambda: None)\n"
        "try:\n    from aigc_cli.frontends.cli.app import app; app(prog_name='aigc')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, file=sys.stderr)\nsys.exit(code)\n"
    )
    env = {**os.environ, "AIGC_SERVER": server.url, "AIGC_API_KEY": KEY}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False"
    assert proc.stdout.strip()
