"""Third-party OpenAI clients against a live `aigc serve --model tiny-random`: LangChain's `OpenAI`
LLM (invoke and stream) and LiteLLM's `text_completion` (plain and streamed, by provider name and
by the `openai/` prefix) get the same text as the official SDK for the same seed, greedy or
sampled. Offline: LiteLLM reads its bundled model-cost map instead of fetching one at import."""

from __future__ import annotations

import os

import pytest

# Before litellm is imported: otherwise its import tries the network for a model-cost map (and
# retries for seconds where there is none).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

openai = pytest.importorskip("openai")
langchain_openai = pytest.importorskip("langchain_openai")
litellm = pytest.importorskip("litellm")

from tests.serving import KEY, MODEL, Server  # noqa: E402

# LiteLLM's pydantic models warn about their own TypedDicts as they load: not this project's concern.
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")

PROMPT = "Once upon a time"
TOKENS = 12
# (temperature, seed): greedy, and two seeds of sampling (their texts differ, so equality means something)
DRAWS = [(0.0, 7), (1.0, 7), (1.0, 8)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("libraries"))
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def sdk_texts(server) -> dict[tuple[float, int], str]:
    """The official SDK's text for each draw: what every other client must get."""
    client = server.client()
    out = {}
    for temperature, seed in DRAWS:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=temperature, seed=seed)
        out[(temperature, seed)] = r.choices[0].text
    assert len({out[(1.0, 7)], out[(1.0, 8)]}) == 2 and all(out.values()), out
    return out


@pytest.mark.parametrize("temperature, seed", DRAWS)
def test_langchain_openai_invoke_and_stream_equal_the_sdk(server, sdk_texts, temperature, seed):
    llm = langchain_openai.OpenAI(
        base_url=server.url + "/v1", api_key=KEY, model=MODEL, max_tokens=TOKENS, temperature=temperature, seed=seed, max_retries=0
    )
    assert llm.invoke(PROMPT) == sdk_texts[(temperature, seed)]
    chunks = list(llm.stream(PROMPT))
    assert len([c for c in chunks if c]) > 1  # streamed as it was made, not one answer
    assert "".join(chunks) == sdk_texts[(temperature, seed)]


@pytest.mark.parametrize("temperature, seed", DRAWS)
@pytest.mark.parametrize(
    "model, provider", [(MODEL, "text-completion-openai"), (f"openai/{MODEL}", None)], ids=["custom_llm_provider", "openai-prefix"]
)
def test_litellm_text_completion_plain_and_streamed_equal_the_sdk(server, sdk_texts, model, provider, temperature, seed):
    common = dict(
        model=model, prompt=PROMPT, api_base=server.url + "/v1", api_key=KEY, max_tokens=TOKENS, temperature=temperature, seed=seed,
        num_retries=0, **({"custom_llm_provider": provider} if provider else {}),
    )
    r = litellm.text_completion(**common)
    assert r.choices[0].text == sdk_texts[(temperature, seed)]
    chunks = [c.choices[0].text or "" for c in litellm.text_completion(**common, stream=True)]
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == sdk_texts[(temperature, seed)]


def test_every_request_reached_the_completions_endpoint(server, sdk_texts):
    """LiteLLM and LangChain did not fall back to chat completions (the server has no chat template)."""
    requests = [line for line in server.log.read_text().splitlines() if '"POST /' in line]
    assert requests and all('"POST /v1/completions" 200' in line for line in requests), requests
