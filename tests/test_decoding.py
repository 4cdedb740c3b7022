"""Decoding checked against references: transformers `generate`, a naive contrastive search, invariances."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from aigc_cli.engine.decoding import _BanLogits, _Decoder, generate_beam, generate_rows, greedy_tokens
from aigc_cli.engine.seeds import row_seed
from aigc_cli.core.textrules import find_stop
from aigc_cli.engine.engine import Engine, Request
from aigc_cli.core.settings import Decoding, GenerationSettings as S

PROMPTS = ["Hello, how are you?", "The", "Once upon a time, in a land far away", "x = 1;"]


def _ids(lm, text):
    return lm.tokenizer.encode(text, add_special_tokens=False)


def _hf_generate(lm, prompt_ids, **kwargs):
    x = torch.tensor([prompt_ids])
    out = lm.hf_model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=lm.tokenizer.eos_token_id, **kwargs
    )
    return [t for t in out[0, len(prompt_ids) :].tolist()]


def _strip_eos(tokens, eos):
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    "extra",
    [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 10}],
    ids=["plain", "reppen", "ngram", "minnew"],
)
def test_greedy_equals_transformers(tiny_lm, prompt, extra):
    ids = _ids(tiny_lm, prompt)
    settings = S(decoding=Decoding.greedy, max_new_tokens=24, **extra).resolved()
    ours = generate_rows(tiny_lm, [ids], settings, [0])[0].token_ids
    ref = _hf_generate(tiny_lm, ids, do_sample=False, max_new_tokens=24, **extra)
    assert ours == _strip_eos(ref, tiny_lm.tokenizer.eos_token_id)


def test_batched_greedy_with_left_padding_equals_one_at_a_time(tiny_lm):
    settings = S(decoding=Decoding.greedy, max_new_tokens=20).resolved()
    prompts = [_ids(tiny_lm, p) for p in PROMPTS]
    batched = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, [0] * len(prompts))]
    alone = [generate_rows(tiny_lm, [p], settings, [0])[0].token_ids for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("prompt", PROMPTS[:3])
@pytest.mark.parametrize("extra", [{}, {"length_penalty": 0.5, "no_repeat_ngram_size": 3}], ids=["plain", "lp-ngram"])
def test_beam_equals_transformers(tiny_lm, prompt, extra):
    ids = _ids(tiny_lm, prompt)
    settings = S(decoding=Decoding.beam, num_beams=4, num_sequences=3, max_new_tokens=16, **extra).resolved()
    ours = [r.token_ids for r in generate_beam(tiny_lm, ids, settings)]
    x = torch.tensor([ids])
    out = tiny_lm.hf_model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=16,
        pad_token_id=tiny_lm.tokenizer.eos_token_id,
        **extra,
    )
    eos = tiny_lm.tokenizer.eos_token_id
    assert ours == [_strip_eos(seq, eos) for seq in out[:, len(ids) :].tolist()]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_contrastive_alpha_zero_equals_greedy(tiny_lm, prompt):
    ids = _ids(tiny_lm, prompt)
    greedy = generate_rows(tiny_lm, [ids], S(decoding=Decoding.greedy, max_new_tokens=20).resolved(), [0])
    contrastive = generate_rows(
        tiny_lm, [ids], S(decoding=Decoding.contrastive, penalty_alpha=0.0, max_new_tokens=20).resolved(), [0]
    )
    assert contrastive[0].token_ids == greedy[0].token_ids


def _naive_contrastive(lm, ids, k, alpha, steps):
    """Su et al. 2022 without a KV cache: every candidate re-runs the whole sequence."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out = lm.hf_model(torch.tensor([seq]), output_hidden_states=True)
            context = out.hidden_states[-1][0]
            probs = torch.softmax(out.logits[0, -1].float(), -1)
            top_p, top_ids = probs.topk(k)
            best, best_score = None, -float("inf")
            for p, v in zip(top_p.tolist(), top_ids.tolist()):
                h = lm.hf_model(torch.tensor([seq + [v]]), output_hidden_states=True).hidden_states[-1][0, -1]
                penalty = torch.nn.functional.cosine_similarity(context, h[None, :], dim=-1).max().item()
                score = (1 - alpha) * p - alpha * penalty
                if score > best_score:
                    best, best_score = v, score
            if best == lm.tokenizer.eos_token_id:
                break
            seq.append(best)
    return seq[len(ids) :]


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_contrastive_equals_naive_reference(tiny_lm, prompt):
    ids = _ids(tiny_lm, prompt)
    settings = S(decoding=Decoding.contrastive, penalty_alpha=0.6, top_k=4, max_new_tokens=12).resolved()
    ours = generate_rows(tiny_lm, [ids], settings, [0])[0].token_ids
    assert ours == _naive_contrastive(tiny_lm, ids, 4, 0.6, 12)
    greedy = generate_rows(tiny_lm, [ids], S(decoding=Decoding.greedy, max_new_tokens=12).resolved(), [0])
    assert ours != greedy[0].token_ids  # alpha > 0 changes the choice on this model: the penalty is live


def test_contrastive_batched_equals_alone(tiny_lm):
    settings = S(decoding=Decoding.contrastive, max_new_tokens=12).resolved()
    prompts = [_ids(tiny_lm, p) for p in PROMPTS]
    batched = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, [0] * 4)]
    alone = [generate_rows(tiny_lm, [p], settings, [0])[0].token_ids for p in prompts]
    assert batched == alone


def test_sampling_is_reproducible_and_batch_invariant(tiny_lm):
    settings = S(max_new_tokens=20, top_k=0).resolved()
    prompts = [_ids(tiny_lm, p) for p in PROMPTS]
    seeds = [row_seed(7, i, 0) for i in range(len(prompts))]
    batched = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, seeds)]
    again = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, seeds)]
    alone = [generate_rows(tiny_lm, [p], settings, [s])[0].token_ids for p, s in zip(prompts, seeds)]
    assert batched == again == alone
    other = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, [s + 1 for s in seeds])]
    assert other != batched


def test_sampling_settings_change_the_distribution(tiny_lm):
    ids = _ids(tiny_lm, "Hello")
    seeds = list(range(24))

    def distinct(**kw):
        """The set of first tokens drawn over many seeds: how wide the filtered distribution is."""
        s = S(max_new_tokens=1, **kw).resolved()
        return {r.token_ids[0] for r in generate_rows(tiny_lm, [ids] * len(seeds), s, seeds)}

    wide = distinct(top_k=0, temperature=1.5)
    assert len(distinct(top_k=1)) == 1  # top-k 1 is greedy
    assert len(distinct(top_k=0, top_p=1e-6)) == 1  # a tiny nucleus is greedy too
    assert len(wide) > 3
    for kw in ({"min_p": 0.5}, {"typical_p": 0.2}, {"temperature": 0.05}):
        assert len(distinct(top_k=0, **kw)) < len(wide), kw


def _engine_texts(tiny_lm, prompt, n, **kw):
    engine = Engine(tiny_lm)
    settings = S(num_sequences=n, max_new_tokens=30, **kw).resolved()
    return list(engine.generate([Request(0, prompt, settings, seed=3)]))


@pytest.mark.parametrize("decoding", ["sample", "beam", "contrastive", "greedy"])
def test_stop_holds_on_every_output(tiny_lm, decoding):
    n = {"sample": 8, "beam": 3}.get(decoding, 1)
    free = _engine_texts(tiny_lm, "Hello, how are you?", n, decoding=Decoding(decoding))
    # Choose stop strings that the unconstrained outputs do contain, so the test has teeth.
    stops = sorted({c.text[3:5] for c in free if len(c.text) >= 5})[:2]
    assert any(s in c.text for c in free for s in stops)
    outs = _engine_texts(tiny_lm, "Hello, how are you?", n, decoding=Decoding(decoding), stop=tuple(stops))
    for c in outs:
        assert not any(s in c.text for s in stops), (c.text, stops)
    if decoding != "beam":  # beam search may rank the hypotheses cut at a stop below others
        assert any(c.finish_reason == "stop" for c in outs)


def _words(text):
    return {w.lower() for w in re.findall(r"\w+", text)}


@pytest.mark.parametrize("decoding", ["sample", "beam", "contrastive", "greedy"])
def test_ban_holds_on_every_output(tiny_lm, decoding):
    n = {"sample": 8, "beam": 3}.get(decoding, 1)
    prompt = "Hello, how are you? I am"
    free = _engine_texts(tiny_lm, prompt, n, decoding=Decoding(decoding))
    words = sorted(set.union(*(_words(c.text) for c in free)), key=len)
    assert words, "the control outputs hold words to ban"
    banned = words[:3]
    outs = _engine_texts(tiny_lm, prompt, n, decoding=Decoding(decoding), ban=tuple(banned))
    for c in outs:
        assert not (_words(c.text) & set(banned)), (c.text, banned)


def test_native_forward_equals_transformers(tiny_lm, tiny_dir):
    """aigc's own GPT-2 forward pass (used for decoding and scoring) against transformers' on the same weights."""
    from aigc_cli.models.gpt2 import load_gpt2

    assert tiny_lm.native
    ids = torch.tensor([_ids(tiny_lm, "Hello, how are you? The night is dark and full of stars")])
    with torch.no_grad():
        ref = tiny_lm.hf_model(ids).logits
        loaded = load_gpt2(tiny_dir)
        assert loaded is not None
        for model in (tiny_lm.model, loaded):
            assert torch.allclose(model(ids).logits, ref, atol=1e-5)
        cache = tiny_lm.model.new_cache(1, 64)  # step by step through the KV cache
        mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        steps = [tiny_lm.model.logits(tiny_lm.model.forward(ids[:, :4], pos[:, :4], mask, cache))]
        for t in range(4, ids.shape[1]):
            steps.append(tiny_lm.model.logits(tiny_lm.model.forward(ids[:, t : t + 1], pos[:, t : t + 1], mask, cache)))
        assert torch.allclose(torch.cat(steps, 1), ref, atol=1e-5)


def test_kv_cache_select_keeps_the_chosen_rows():
    """Reordering, shrinking and branching the cache (beam, finished rows, contrastive search) through
    its reused buffers keeps exactly the chosen rows' filled positions, as plain indexing would."""
    from aigc_cli.models.gpt2 import Config, KVCache

    cfg = Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=10, eps=1e-5, tied=True)
    cache = KVCache(cfg, 4, 16, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    ref_k, ref_v = torch.randn(2, 4, 2, 6, 4, generator=gen), torch.randn(2, 4, 2, 6, 4, generator=gen)
    cache.k[:, :, :, :6], cache.v[:, :, :, :6], cache.length = ref_k, ref_v, 6
    for index in ([3, 3, 0, 1], [1, 0, 2, 2], [2, 0], [1, 1, 0, 0, 1, 1], [0, 3, 5], [2, 1, 0]):
        idx = torch.tensor(index)
        cache.select(idx)
        ref_k, ref_v = ref_k[:, idx], ref_v[:, idx]
        n = cache.length
        assert torch.equal(cache.k[:, :, :, :n], ref_k) and torch.equal(cache.v[:, :, :, :n], ref_v), index
        # the next decoding step writes one more position
        k, v = torch.randn(2, len(index), 2, 1, 4, generator=gen), torch.randn(2, len(index), 2, 1, 4, generator=gen)
        cache.k[:, :, :, n : n + 1], cache.v[:, :, :, n : n + 1], cache.length = k, v, n + 1
        ref_k, ref_v = torch.cat([ref_k, k], 3), torch.cat([ref_v, v], 3)


@pytest.mark.parametrize("tied", [True, False])
def test_native_load_maps_the_token_table(tmp_path, tied):
    """Loaded from safetensors, the float32 CPU model reads token embeddings from a map of the
    weights file (the LM head has its own packed copy) and still computes transformers' logits."""
    import sys
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc_cli.models.gpt2 import load_gpt2

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tied)
    ref_model = GPT2LMHeadModel(config).eval()
    ref_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 9))
    model = load_gpt2(tmp_path)
    assert model is not None
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-5)
    if not sys.platform.startswith("linux") or model.head.packed is None:
        pytest.skip("the table is mapped only when the LM head is packed for oneDNN (Linux)")
    ptr = model.wte.data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines()
    owners = [line.split()[-1] for line in maps if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)]
    assert owners == [str((tmp_path / "model.safetensors").resolve())]


def test_native_load_without_memory_maps(tiny_lm, tiny_dir, monkeypatch):
    """Where the weights file cannot be mapped, the token table is read into memory instead."""
    from aigc_cli.models.gpt2 import load_gpt2
    from aigc_cli.models.weights import SafetensorsReader

    def refuse(self, name):
        raise OSError("no mmap here")

    monkeypatch.setattr(SafetensorsReader, "mapped", refuse)
    ids = torch.tensor([_ids(tiny_lm, "Hello, how are you?")])
    model = load_gpt2(tiny_dir)
    assert model is not None
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_lm.hf_model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_weights_to_pack_are_read_through_a_map_and_nothing_else_keeps_one(tmp_path, monkeypatch, onednn):
    """Every matrix that will be packed for oneDNN (and the LM head) is read through a map of the
    weights file: the reorder reads it once, from the page cache. Without packing (AIGC_ONEDNN=0)
    no weight may keep a map: the model then holds plain copies, as before. Logits as transformers'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc_cli.models.gpt2 import load_gpt2
    from aigc_cli.models.weights import SafetensorsReader

    torch.manual_seed(0)
    ref_model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    ref_model.save_pretrained(tmp_path)
    monkeypatch.setenv("AIGC_ONEDNN", onednn)
    mapped: list[str] = []
    real = SafetensorsReader.mapped
    monkeypatch.setattr(SafetensorsReader, "mapped", lambda self, name: mapped.append(name) or real(self, name))
    model = load_gpt2(tmp_path)
    assert model is not None
    packing = model.head.packed is not None
    if onednn == "1" and not packing:
        pytest.skip("no oneDNN packed kernels in this torch build")
    matrices = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    if packing:
        assert matrices | {"transformer.wte.weight"} <= set(mapped)  # the head (tied: the table) too
        assert all(layer[j].weight is None for layer in model.layers for j in (2, 3, 6, 7))
    else:
        assert mapped == []
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-5)


def test_weights_are_transposed_for_packing_through_one_buffer_per_loader_thread():
    """oneDNN's reorder copies a transposed view into fresh memory of its own, whose page faults
    cost more than the copy: the loader copies each Conv1D weight's transpose into a buffer that
    its thread uses again (grown when a larger weight comes), and a weight whose transpose is
    contiguous already (the LM head over the token table) is not copied at all."""
    import threading

    from aigc_cli.models.gpt2 import _transposed

    scratch = threading.local()
    big, small = torch.randn(8, 24), torch.randn(8, 8)  # (in, out), as GPT-2 stores them
    first = _transposed(big, scratch)
    assert first.is_contiguous() and torch.equal(first, big.t())
    second = _transposed(small, scratch)
    assert second.is_contiguous() and torch.equal(second, small.t())
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # the same buffer
    table = torch.randn(30, 8)  # (vocab, dim): its transpose's transpose is the table itself
    assert _transposed(table.t(), scratch).data_ptr() == table.data_ptr()
    assert _transposed(big, None).data_ptr() == big.data_ptr()  # no buffer: oneDNN copies it


def test_processors_equal_transformers():
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    from aigc_cli.engine.processors import MinNewTokens, NoBadWords, NoRepeatNGram, RepetitionPenalty

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (4, 9), generator=gen)
    ids[1, -3:] = torch.tensor([3, 4, 5])
    scores = torch.randn(4, 12, generator=gen)
    bad = [[7], [4, 5, 6], [9, 2]]
    pairs = [
        (RepetitionPenalty(1.7), RepetitionPenaltyLogitsProcessor(penalty=1.7)),
        (NoRepeatNGram(2), NoRepeatNGramLogitsProcessor(2)),
        (NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3)),
        (NoRepeatNGram(1), NoRepeatNGramLogitsProcessor(1)),
        (NoBadWords(bad), NoBadWordsLogitsProcessor(bad, eos_token_id=11)),
        (MinNewTokens(5, 6, 11), MinNewTokensLengthLogitsProcessor(5, 6, 11)),
        (MinNewTokens(5, 3, 11), MinNewTokensLengthLogitsProcessor(5, 3, 11)),
        (MinNewTokens(5, 4, 11), MinNewTokensLengthLogitsProcessor(5, 4, 11)),  # the boundary: 4 new tokens made
        (MinNewTokens(5, 5, 11), MinNewTokensLengthLogitsProcessor(5, 5, 11)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone())), type(ours).__name__


def test_sampler_filters_equal_transformers_warpers():
    """The shortlist sampler keeps exactly the tokens transformers' warpers keep."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    from aigc_cli.engine.decoding import _Sampler

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 300, generator=gen) * 3
    cases = [
        dict(top_k=50, top_p=0.8),
        dict(top_k=0, top_p=0.5, temperature=0.7),
        dict(top_k=20, min_p=0.1),
        dict(top_k=40, typical_p=0.6),
        dict(top_k=30, top_p=0.9, min_p=0.05, typical_p=0.8, temperature=1.3),
    ]
    for kw in cases:
        s = S(**kw).resolved()
        warpers = [TemperatureLogitsWarper(s.temperature)]
        if s.top_k:
            warpers.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            warpers.append(TopPLogitsWarper(s.top_p))
        if s.min_p:
            warpers.append(MinPLogitsWarper(s.min_p))
        if s.typical_p < 1:
            warpers.append(TypicalLogitsWarper(s.typical_p))
        ref = scores.clone()
        for w in warpers:
            ref = w(None, ref)
        expected = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in ref]
        drawn = [set() for _ in range(6)]
        sampler = _Sampler(s)
        seeds = torch.arange(6)
        for step in range(400):
            for row, token in enumerate(sampler(scores.clone(), seeds, torch.full((6,), step)).tolist()):
                drawn[row].add(token)
        for row in range(6):
            assert drawn[row] <= expected[row], kw  # never outside the filtered set
            if len(expected[row]) <= 5:
                assert drawn[row] == expected[row], kw  # and small sets are covered


def test_the_race_draws_from_the_filtered_distribution():
    """Gumbel-max with counter-based noise: frequencies over many draws match the probabilities."""
    from aigc_cli.engine.decoding import _Sampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]])
    probs = torch.softmax(logits, -1)[0]
    sampler = _Sampler(S(top_k=0).resolved())
    n = 20000
    counts = torch.zeros(6)
    for step in range(n):
        counts[int(sampler(logits, torch.tensor([11]), torch.tensor([step]))[0])] += 1
    # each frequency within 4.5 standard errors of its probability
    assert ((counts / n - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), (counts / n, probs)


def test_the_two_stage_race_draws_from_the_whole_distribution():
    """Plain sampling over a large vocabulary races blocks on their masses, then tokens inside the
    winning block: the same distribution as one race over every token (frequencies within 4.5
    standard errors of softmax; a banned (-inf) token never drawn)."""
    from aigc_cli.engine.decoding import _Sampler

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3001, generator=gen) * 2  # 11 full blocks and a partial one
    logits[0, 7] = -float("inf")
    logits[0, 3000] = 4.0  # the partial block holds a likely token
    probs = torch.softmax(logits, -1)[0]
    sampler = _Sampler(S(top_k=0).resolved())
    n, counts = 100_000, torch.zeros(3001)
    for start in range(0, n, 10_000):
        rows = logits.expand(10_000, -1)
        seeds = torch.arange(start, start + 10_000)
        counts += torch.bincount(sampler(rows, seeds, torch.zeros(10_000, dtype=torch.long)), minlength=3001).float()
    freq = counts / n
    assert counts[7] == 0
    assert ((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 2e-5).all()
    assert 0.5 * (freq - probs).abs().sum() < 0.06  # total variation: sampling noise alone gives ~0.04 here


def test_the_race_ignores_noise_at_the_level_batch_shapes_cause():
    """A nucleus of ~30,000 near-equal tokens (top-p 0.9, top-k off) whose logits move by 3e-6, as a
    different batch shape moves them: the drawn token hardly ever changes (inverse-CDF sampling
    over the same nucleus and noise changes 302 of these 512 draws)."""
    from aigc_cli.engine.decoding import _Sampler

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50257, generator=gen) * 0.05
    moved = logits + torch.randn(64, 50257, generator=gen) * 3e-6
    sampler = _Sampler(S(top_k=0, top_p=0.9).resolved())
    seeds = torch.arange(64) * 7919
    flips = 0
    for step in range(8):
        draws = torch.full((64,), step)
        flips += int((sampler(logits, seeds, draws) != sampler(moved, seeds, draws)).sum())
    assert flips <= 2, flips  # of 512 draws
    other = sampler(logits, seeds + 1, torch.zeros(64, dtype=torch.long))
    assert int((other != sampler(logits, seeds, torch.zeros(64, dtype=torch.long))).sum()) > 60  # seeds matter
    plain = _Sampler(S(top_k=0).resolved())  # the whole vocabulary: the two-stage race
    flips = sum(
        int((plain(logits, seeds, torch.full((64,), step)) != plain(moved, seeds, torch.full((64,), step))).sum()) for step in range(8)
    )
    assert flips <= 2, flips


@pytest.mark.parametrize(
    "extra",
    [
        {"early_stopping": True},
        {"length_penalty": 2.0, "min_new_tokens": 6},
        {"length_penalty": -0.5, "repetition_penalty": 1.4},
        {"stop": ("e", "o")},
        {"no_repeat_ngram_size": 1, "num_sequences": 4},
    ],
    ids=["early", "lp2-min", "lpneg-rep", "stop", "ngram1"],
)
def test_native_beam_search_equals_transformers_beam_search(tiny_lm, extra):
    from aigc_cli.engine.decoding import _beam_loop

    kw = {"num_sequences": 3, **extra}
    for prompt in PROMPTS[:3]:
        settings = S(decoding=Decoding.beam, num_beams=4, max_new_tokens=14, **kw).resolved()
        ids = _ids(tiny_lm, prompt)
        ours = _beam_loop(_Decoder(tiny_lm, [ids], settings, None), tiny_lm.model)
        theirs = _beam_transformers(tiny_lm, _Decoder(tiny_lm, [ids], settings, None))
        eos = tiny_lm.tokenizer.eos_token_id
        assert [_strip_eos(x, eos) for x in ours] == [_strip_eos(x, eos) for x in theirs], (prompt, extra)


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_recorded_logprobs_equal_scoring_the_finished_text(tiny_lm, decoding):
    """Log-probabilities recorded while decoding (poem reranking uses them) are the unprocessed
    model's: equal to scoring the generated tokens afterwards, even under a repetition penalty."""
    from aigc_cli.engine.scoring import continuation_logprobs

    n = 3 if decoding == "sample" else 1
    settings = S(decoding=Decoding(decoding), num_sequences=n, max_new_tokens=16, repetition_penalty=1.5, seed=2).resolved()
    engine = Engine(tiny_lm)
    outs = list(engine.generate([Request(0, p, settings, 2) for p in PROMPTS[:2]], logprobs=True))
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in outs)
    pairs = [(_ids(tiny_lm, c.prompt), c.token_ids) for c in outs]
    for c, ref in zip(outs, continuation_logprobs(tiny_lm.model, pairs)):
        assert c.logprobs == pytest.approx(ref, abs=1e-4)
    plain = list(engine.generate([Request(0, PROMPTS[0], settings, 2)]))
    assert plain[0].logprobs is None


class _StopOnText:
    """transformers' stopping criterion for stop strings: a beam is done once its text holds one."""

    def __init__(self, tokenizer: Any, prompt_width: int, stops: Sequence[str]) -> None:
        self.tok, self.width, self.stops = tokenizer, prompt_width, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.width :], clean_up_tokenization_spaces=False)
        done = [find_stop(t, self.stops) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)




def _beam_transformers(lm: Any, dec: _Decoder) -> list[list[int]]:
    """The reference: beam search by transformers' `generate` on the same weights and rules."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    s = dec.s
    extra = LogitsProcessorList([p for p in dec.processors if p in dec.extra or isinstance(p, _BanLogits)])
    out = lm.hf_model.generate(
        input_ids=dec.ids,
        attention_mask=dec.mask,
        do_sample=False,
        num_beams=s.num_beams,
        num_return_sequences=s.num_sequences,
        length_penalty=s.length_penalty,
        early_stopping=s.early_stopping,
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=s.min_new_tokens or None,
        repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size or None,
        bad_words_ids=dec.ban_token_sequences() or None,
        logits_processor=extra,
        stopping_criteria=StoppingCriteriaList([_StopOnText(lm.tokenizer, dec.prompt_width, s.stop)]) if s.stop else None,
        pad_token_id=dec.pad,
        eos_token_id=dec.eos,
    )
    return out[:, dec.prompt_width :].tolist()


def test_incremental_text_equals_decoding_the_whole_row_every_step(tiny_lm):
    """A row's text is decoded incrementally (settled tokens are never decoded again); at every
    step it must equal decoding all its tokens at once, also where a character's bytes span tokens
    (random raw bytes, emoji, CJK), and stop strings are found exactly where a full search finds them."""
    import random

    from aigc_cli.core.settings import GenerationSettings
    from aigc_cli.core.textrules import find_stop
    from aigc_cli.engine.decoding import _Row

    tok = tiny_lm.tokenizer
    rng = random.Random(0)
    pieces = [tok.encode(t, add_special_tokens=False) for t in ("the sea", " 海浪", " 🌊 night", "é", " fire")]
    for trial in range(40):
        stops = ("sea n",) if trial % 2 else ()
        settings = GenerationSettings(max_new_tokens=400, stop=stops).resolved()
        row = _Row(tok, "")
        ids: list[int] = []
        for step in range(300):
            token = rng.randrange(256) if rng.random() < 0.3 else rng.choice(rng.choice(pieces))
            ids.append(token)
            row.push(token, step, None, settings)
            full = tok.decode(ids, clean_up_tokenization_spaces=False)
            cut = find_stop(full, stops) if stops else None
            assert row.text == (full[:cut] if cut is not None else full), (trial, step)
            if row.finish_reason is not None:
                break


def test_beam_search_prefills_the_prompt_once_for_every_beam(tiny_lm, monkeypatch):
    """transformers prefills one copy of the prompt per beam; we prefill it once and repeat its keys
    and values: the beams' passes are then one new token each, and the beams equal transformers'."""
    ids = _ids(tiny_lm, "he was in the house of the king and")
    real, shapes = tiny_lm.model.forward, []

    def forward(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(tiny_lm.model, "forward", forward)
    settings = S(decoding=Decoding.beam, num_beams=4, num_sequences=2, max_new_tokens=10).resolved()
    ours = [r.token_ids for r in generate_beam(tiny_lm, ids, settings)]
    assert shapes[0] == (1, len(ids)) and set(shapes[1:]) == {(4, 1)}
    x = torch.tensor([ids])
    out = tiny_lm.hf_model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=4, num_return_sequences=2,
        max_new_tokens=10, pad_token_id=tiny_lm.tokenizer.eos_token_id,
    )
    assert ours == [_strip_eos(row[len(ids) :].tolist(), tiny_lm.tokenizer.eos_token_id) for row in out]


@pytest.mark.parametrize("decoding", ["sample", "contrastive"])
def test_the_static_loop_prefills_a_repeated_prompt_once(tiny_lm, decoding, monkeypatch):
    """Rows that repeat a prompt (`-n 3` on the static path: poem forms, grouped batching) are
    prefilled once and their keys and values repeated; each row gets the tokens it gets alone."""
    a, b = _ids(tiny_lm, PROMPTS[0]), _ids(tiny_lm, PROMPTS[1])
    prompts, seeds = [a, b, a, a, b], [1, 2, 3, 4, 5]
    settings = S(decoding=Decoding(decoding), max_new_tokens=8, **({"top_k": 3} if decoding == "contrastive" else {})).resolved()
    real, batches = tiny_lm.model.forward, []

    def forward(x, *args, **kwargs):
        batches.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(tiny_lm.model, "forward", forward)
    together = [r.token_ids for r in generate_rows(tiny_lm, prompts, settings, seeds)]
    assert batches[0] == 2
    monkeypatch.setattr(tiny_lm.model, "forward", real)
    assert together == [generate_rows(tiny_lm, [p], settings, [seed])[0].token_ids for p, seed in zip(prompts, seeds)]
    if decoding == "sample":
        assert len({tuple(t) for t in together}) > 2  # the seeds really drew apart


def test_greedy_tokens_are_torchs_argmax():
    """numpy's argmax where it applies, torch's elsewhere: the first of equal maxima, NaN above all,
    rows of -inf, float16, strided rows."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50257, generator=g)
    scores[1, [7, 90, 50000]] = 99.0  # ties: the first
    scores[2, [5, 40000]] = math.nan  # NaN wins, the first
    scores[3] = -math.inf
    scores[4, 123] = math.inf
    for s in (scores, scores.half(), scores.double(), scores[:, ::3], scores.bfloat16(), scores.clone().requires_grad_()):
        assert greedy_tokens(s) == s.argmax(-1).tolist()
    assert greedy_tokens(scores)[1:5] == [7, 5, 0, 123]
