"""The model-backend seam: a model aigc's GPT-2 forward pass does not run (a tiny Llama) goes through
the transformers adapter for every decoding mode and for scoring, equal to transformers itself."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.engine.engine import Engine, Request
from aigc_cli.core.settings import Decoding, GenerationSettings as S


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc_cli.models.tiny import build_tiny

    _, tokenizer = build_tiny()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked logits, so that sampled and greedy texts differ visibly
        model.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(llama_dir):
    return Engine.load(str(llama_dir))


def test_the_adapter_runs_what_the_native_pass_cannot(llama):
    from aigc_cli.models.backends import TransformersBackend

    assert isinstance(llama.lm.model, TransformersBackend) and not llama.lm.native
    assert llama.lm.model.continuous is False
    # 2 layers x 2 KV heads x 16 dims x keys and values x 4 bytes
    assert llama.lm.model.kv_bytes_per_position() == 2 * 2 * 2 * 16 * 4


def _hf_generate(engine, prompt, **kw):
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    hf = engine.lm.hf_model
    eos = engine.tokenizer.eos_token_id
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=eos, **kw)
    return [engine.tokenizer.decode([t for t in seq[len(ids) :].tolist() if t != eos], clean_up_tokenization_spaces=False) for seq in out]


@pytest.mark.parametrize("prompt", ["Hello there", "The sea at night", "A"])
def test_greedy_and_beam_equal_transformers_generate(llama, prompt):
    greedy = S(decoding=Decoding.greedy, max_new_tokens=12).resolved()
    (ours,) = llama.generate([Request(0, prompt, greedy, 0)])
    assert ours.text == _hf_generate(llama, prompt, do_sample=False, max_new_tokens=12)[0]
    beam = S(decoding=Decoding.beam, num_beams=3, num_sequences=2, max_new_tokens=10).resolved()
    ours = [c.text for c in llama.generate([Request(0, prompt, beam, 0)])]
    assert ours == _hf_generate(llama, prompt, do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=10)


def test_batched_rows_equal_rows_alone_and_sampling_is_seeded(llama):
    prompts = ["Hello there", "The sea at night", "A", "Once upon a time there was"]
    greedy = S(decoding=Decoding.greedy, max_new_tokens=8).resolved()
    together = [c.text for c in llama.generate([Request(i, p, greedy, 0) for i, p in enumerate(prompts)], batch_size=4)]
    alone = [next(iter(llama.generate([Request(i, p, greedy, 0)]))).text for i, p in enumerate(prompts)]
    assert together == alone  # left padding and the cache's row selection on a transformers cache
    sample = S(num_sequences=3, max_new_tokens=8).resolved()
    first = [c.text for c in llama.generate([Request(0, "Hello", sample, 5)])]
    assert first == [c.text for c in llama.generate([Request(0, "Hello", sample, 5)])]
    assert len(set(first)) > 1
    contrastive = S(decoding=Decoding.contrastive, max_new_tokens=6).resolved()
    (c,) = llama.generate([Request(0, "Hello", contrastive, 0)])
    assert c.completion_tokens > 0


def test_scoring_equals_transformers_logits(llama):
    from aigc_cli.engine.scoring import continuation_logprobs, prompt_logprobs

    ids = llama.tokenizer.encode("The sea at night is", add_special_tokens=False)
    logits = llama.lm.hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    got = prompt_logprobs(llama.lm.model, ids, 2)
    assert got[0] is None and [g[0] for g in got[1:]] == pytest.approx(ref, abs=1e-5)
    (cont,) = continuation_logprobs(llama.lm.model, [(ids[:2], ids[2:])])
    assert cont == pytest.approx(ref[1:], abs=1e-5)


def test_the_cli_runs_it(cli, llama_dir):
    r = cli("generate", "Hello", "--model", str(llama_dir), "--max-new-tokens", "5", "--format", "jsonl", "--seed", "1")
    assert r.exit_code == 0, r.stderr
    r = cli("score", "-", "--model", str(llama_dir), input="The sea at night is dark.\n")
    assert r.exit_code == 0, r.stderr
