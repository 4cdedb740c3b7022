"""One bad request fails alone: eight streams in flight on a live server finish byte-identical to
a run without it, whether the bad request is refused by validation (a lone surrogate in `ban`) or
fails inside the engine's step (a fault injected into its row, past every check)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from aigc_cli.engine.scheduler import Scheduler
from tests.serving import MODEL, InProcessServer, sse_events

PROMPTS = ["the sea at night", "Once upon a time", "He was in", "it is the", "for his", "Dear diary,", "The news", "cold gold"]


@pytest.fixture(scope="module")
def server():
    s = InProcessServer(batch_size=16)
    yield s
    s.stop()


def _stream(server: InProcessServer, prompt: str, seed: int, extra: dict | None = None) -> tuple[int, list]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "min_tokens": 200, "seed": seed, "stream": True, "top_k": 50, **(extra or {})}
    status, _, data = server.raw("POST", "/v1/completions", json.dumps(body, ensure_ascii=True).encode())
    return status, sse_events(data) if status == 200 else json.loads(data)


def _eight(server: InProcessServer, bad: dict | None) -> tuple[list, object]:
    """The eight streams, with the bad request among them; (their events, its answer)."""
    with ThreadPoolExecutor(9) as pool:
        odd = pool.submit(_stream, server, "the bad one", 99, {"max_tokens": 60, "min_tokens": 60, **bad}) if bad is not None else None
        futures = [pool.submit(_stream, server, p, i) for i, p in enumerate(PROMPTS)]
        results = [f.result() for f in futures]
        return results, odd.result() if odd is not None else None


def _texts(results: list) -> list[str]:
    out = []
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        out.append("".join(c["text"] for e in events[:-1] for c in e["choices"]))
    return out


def test_a_lone_surrogate_in_ban_fails_that_request_alone(server):
    clean, _ = _eight(server, None)
    results, (status, answer) = _eight(server, {"ban": ["ok\udfff"]})
    assert status == 400 and answer["error"]["param"] == "ban", answer
    assert _texts(results) == _texts(clean)


def test_a_fault_inside_the_engine_step_fails_that_request_alone(server, monkeypatch):
    clean, _ = _eight(server, None)
    doomed = server.state.engine.tokenizer.encode("the bad one")
    calls = {"n": 0}

    def fault(spec) -> None:
        if spec.prompt_ids == doomed:
            calls["n"] += 1
            if calls["n"] >= 20:  # after some tokens went out, while the eight run
                raise RuntimeError("injected fault")

    monkeypatch.setattr(Scheduler, "fault", staticmethod(fault))
    results, (status, events) = _eight(server, {})
    assert calls["n"] >= 20
    assert status == 200 and "error" in events[-1] and "injected fault" in events[-1]["error"]["message"], events[-2:]
    assert "[DONE]" not in events  # a cut stream never looks finished
    assert _texts(results) == _texts(clean)
    monkeypatch.undo()
    again, _ = _eight(server, None)  # and the server goes on
    assert _texts(again) == _texts(clean)
