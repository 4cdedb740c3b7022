"""The continuous-batching scheduler: rows join and leave a running batch, whatever their settings,
and a row's tokens never depend on what runs beside it."""

from __future__ import annotations

import random

import pytest
import torch

from aigc_cli.engine.seeds import row_seed
from aigc_cli.engine.scheduler import Failed, Finished, RowSpec, Scheduler, Token
from aigc_cli.core.settings import GenerationSettings

WORDS = "the of and to in is was he for it with as his on be at by had are but from or have an they".split()


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _spec(tiny_lm, key, prompt, settings, seed=3) -> RowSpec:
    ids = tiny_lm.tokenizer.encode(prompt, add_special_tokens=False)
    return RowSpec(key, ids, settings, row_seed(seed, key, 0))


def _drain(sched: Scheduler, arrivals: dict[int, list[RowSpec]] | None = None) -> dict:
    """Step until idle, submitting `arrivals[step]` before that step; {key: result}."""
    arrivals = dict(arrivals or {})
    results, step = {}, 0
    while sched.busy or arrivals:
        for spec in arrivals.pop(step, []):
            sched.submit(spec)
        for event in sched.step():
            if isinstance(event, Finished):
                assert event.key not in results
                results[event.key] = event.result
        step += 1
        assert step < 10_000
    return results


def _alone(tiny_lm, spec: RowSpec):
    sched = Scheduler(tiny_lm, max_rows=1)
    sched.submit(spec)
    return _drain(sched)[spec.key]


GREEDY = GenerationSettings(decoding="greedy", max_new_tokens=12).resolved()


def test_a_row_joining_mid_decode_gives_its_tokens_alone(tiny_lm):
    late = _spec(tiny_lm, "late", "the cat", GREEDY)
    sched = Scheduler(tiny_lm, max_rows=8)
    early = [_spec(tiny_lm, f"e{i}", p, GREEDY) for i, p in enumerate(["he was in the", "it is", "for his"])]
    results = _drain(sched, {0: early, 5: [late]})
    assert results["late"].token_ids == _alone(tiny_lm, late).token_ids
    for spec in early:
        assert results[spec.key].token_ids == _alone(tiny_lm, spec).token_ids


def test_the_greedy_scheduler_equals_transformers_generate(tiny_lm):
    import torch

    prompts = ["the of and", "he", "was in the house of"]
    sched = Scheduler(tiny_lm, max_rows=2)
    results = _drain(sched, {i: [_spec(tiny_lm, i, p, GREEDY)] for i, p in enumerate(prompts)})
    hf = tiny_lm.hf_model
    for i, p in enumerate(prompts):
        ids = torch.tensor([tiny_lm.tokenizer.encode(p, add_special_tokens=False)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assert results[i].token_ids == out[0, ids.shape[1] :].tolist()


def test_cancelling_frees_the_slot_and_leaves_the_others_alone(tiny_lm):
    long = GenerationSettings(decoding="greedy", max_new_tokens=30).resolved()
    specs = [_spec(tiny_lm, k, p, long) for k, p in (("a", "the of"), ("b", "he was"), ("c", "it is in"))]
    sched = Scheduler(tiny_lm, max_rows=3)
    for spec in specs:
        sched.submit(spec)
    seen: dict = {}
    for _ in range(4):
        for event in sched.step():
            if isinstance(event, Token):
                seen.setdefault(event.key, []).append(event.token)
    assert len(sched.live) == 3
    sched.cancel("b")
    queued = _spec(tiny_lm, "d", "and", long)
    sched.submit(queued)
    sched.cancel("d")  # a queued row is dropped before it takes a slot
    sched.step()
    assert len(sched.live) == 2 and sched.slots.rows == 2
    results = _drain(sched)
    assert set(results) == {"a", "c"}
    for spec in (specs[0], specs[2]):
        assert results[spec.key].token_ids == _alone(tiny_lm, spec).token_ids


def _mixed_specs(tiny_lm, n: int, rng: random.Random, sampled: bool) -> list[RowSpec]:
    specs = []
    for i in range(n):
        kwargs = dict(max_new_tokens=rng.randint(1, 16))
        if rng.random() < 0.3:
            kwargs["stop"] = (rng.choice(["e", "a", "o"]),)
        if rng.random() < 0.2:
            kwargs["repetition_penalty"] = 1.3
        if rng.random() < 0.2:
            kwargs["no_repeat_ngram_size"] = 2
        if rng.random() < 0.1:
            kwargs["ban"] = ("the",)
        if rng.random() < 0.2:
            kwargs["min_new_tokens"] = min(3, kwargs["max_new_tokens"])
        if sampled:
            kwargs.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([0, 5, 50]), top_p=rng.choice([0.8, 1.0]))
        else:
            kwargs["decoding"] = "greedy"
        specs.append(_spec(tiny_lm, i, _prompt(rng), GenerationSettings(**kwargs).resolved(), seed=11))
    return specs


def _arrivals(specs: list[RowSpec], rng: random.Random) -> dict[int, list[RowSpec]]:
    arrivals: dict[int, list[RowSpec]] = {}
    for spec in specs:
        arrivals.setdefault(rng.randint(0, 60), []).append(spec)
    return arrivals


def test_200_greedy_requests_arriving_at_random_equal_one_at_a_time(tiny_lm):
    rng = random.Random(5)
    specs = _mixed_specs(tiny_lm, 200, rng, sampled=False)
    together = _drain(Scheduler(tiny_lm, max_rows=16), _arrivals(specs, rng))
    alone = _drain(Scheduler(tiny_lm, max_rows=1), {0: specs})
    assert len(together) == 200
    assert {k: r.token_ids for k, r in together.items()} == {k: r.token_ids for k, r in alone.items()}
    assert {k: r.finish_reason for k, r in together.items()} == {k: r.finish_reason for k, r in alone.items()}


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_200_sampled_requests_do_not_depend_on_arrival_order_or_batch(tiny_lm, rows):
    rng = random.Random(9)
    specs = _mixed_specs(tiny_lm, 200, rng, sampled=True)
    reference = _drain(Scheduler(tiny_lm, max_rows=4), {0: specs})
    shuffled = specs[:]
    rng.shuffle(shuffled)
    got = _drain(Scheduler(tiny_lm, max_rows=rows), _arrivals(shuffled, rng))
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in reference.items()}
    assert len({tuple(r.token_ids) for r in got.values()}) > 150  # the rows really sampled


def test_rows_stream_their_text_and_logprobs(tiny_lm):
    import torch

    texts = []
    spec = _spec(tiny_lm, "s", "the of", GenerationSettings(max_new_tokens=6, seed=1).resolved())
    spec.on_text = texts.append
    spec.logprobs = True
    result = _drain(Scheduler(tiny_lm, 4), {0: [spec]})["s"]
    assert texts[-1] == result.text and len(texts) == len(result.token_ids)
    ids = torch.tensor([spec.prompt_ids + result.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm.hf_model(ids).logits[0].float(), -1)
    start = len(spec.prompt_ids) - 1
    expected = [float(logp[start + i, t]) for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_rows_of_very_different_lengths_attend_in_blocks_and_keep_their_tokens(tiny_lm, monkeypatch):
    """Long prompts beside short ones, joining at random steps: torch's decode attention (a model
    without the compiled kernels, which take each row at its own length) runs per block of slots,
    each up to its own longest row, and every row still gets exactly the tokens it gets alone."""
    import dataclasses

    from aigc_cli.models import fused, gpt2

    monkeypatch.setattr(fused, "row_ops", lambda: None)
    tiny_lm = dataclasses.replace(tiny_lm, model=gpt2.from_hf_model(tiny_lm.hf_model))
    assert tiny_lm.model.rowops is None
    split = []
    blocks = gpt2.attention_blocks

    def counted(lengths):
        found = blocks(lengths)
        split.append(len(found) > 1 and any(min(lengths[lo:hi]) != top for lo, hi, top in found))
        return found

    monkeypatch.setattr(gpt2, "attention_blocks", counted)
    rng = random.Random(21)
    specs = []
    for i in range(40):
        words = rng.choice([2, 5, 60, 120])
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        settings = GenerationSettings(decoding="greedy", max_new_tokens=rng.randint(4, 40)).resolved()
        specs.append(_spec(tiny_lm, i, prompt, settings))
    together = _drain(Scheduler(tiny_lm, max_rows=24), _arrivals(specs, rng))
    assert any(split), "no step split its attention into blocks of rows of different lengths"
    alone = {s.key: _alone(tiny_lm, s) for s in specs}
    assert {k: r.token_ids for k, r in together.items()} == {k: r.token_ids for k, r in alone.items()}


def test_attention_blocks_cover_every_slot_once_and_merge_equal_rows():
    from aigc_cli.models.gpt2 import ATTENTION_BLOCK, attention_blocks

    assert attention_blocks([50] * 40) == [(0, 40, 50)]  # equal lengths: one call, as a static batch
    lengths = [300] * ATTENTION_BLOCK + [10] * ATTENTION_BLOCK * 3
    blocks = attention_blocks(lengths)
    assert blocks == [(0, ATTENTION_BLOCK, 300), (ATTENTION_BLOCK, 4 * ATTENTION_BLOCK, 10)]
    rng = random.Random(1)
    lengths = [rng.randint(1, 900) for _ in range(61)]
    blocks = attention_blocks(lengths)
    assert [lo for lo, _, _ in blocks] == [0] + [hi for _, hi, _ in blocks[:-1]] and blocks[-1][1] == 61
    assert all(top == max(lengths[lo:hi]) for lo, hi, top in blocks)


def test_contrastive_rows_share_the_scheduler_and_equal_the_static_loop(tiny_lm):
    """Contrastive-search rows (top-k 2..5, penalties, bans, stop strings) join a running batch of
    greedy and sampled rows at random steps, in a batch small enough that slots are refilled: each
    gives exactly the static loop's tokens for its prompt alone, and the others theirs."""
    from aigc_cli.engine.decoding import generate_rows

    rng = random.Random(13)
    specs = _mixed_specs(tiny_lm, 40, rng, sampled=True)[:20]
    for i in range(20, 44):
        kwargs = dict(decoding="contrastive", top_k=rng.randint(2, 5), penalty_alpha=rng.choice([0.3, 0.6, 0.9]))
        kwargs["max_new_tokens"] = rng.randint(1, 16)
        if rng.random() < 0.3:
            kwargs["repetition_penalty"] = 1.3
        if rng.random() < 0.2:
            kwargs["ban"] = ("the",)
        if rng.random() < 0.2:
            kwargs["stop"] = ("e",)
        specs.append(_spec(tiny_lm, i, _prompt(rng), GenerationSettings(**kwargs).resolved()))
    together = _drain(Scheduler(tiny_lm, max_rows=12), _arrivals(specs, rng))
    for spec in specs:
        if spec.settings.decoding.value == "contrastive":
            static = generate_rows(tiny_lm, [spec.prompt_ids], spec.settings, [spec.seed])[0]
            assert (together[spec.key].token_ids, together[spec.key].text) == (static.token_ids, static.text), spec
        else:
            assert together[spec.key].token_ids == _alone(tiny_lm, spec).token_ids


def test_contrastive_on_the_scheduler_equals_the_naive_reference(tiny_lm):
    from tests.test_decoding import _naive_contrastive

    settings = GenerationSettings(decoding="contrastive", penalty_alpha=0.6, top_k=4, max_new_tokens=12).resolved()
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=12).resolved()
    specs = [_spec(tiny_lm, i, p, settings) for i, p in enumerate(["Hello there", "the of and to in", "A"])]
    beside = [_spec(tiny_lm, 10 + i, p, greedy) for i, p in enumerate(["was he for it", "Hello"])]
    got = _drain(Scheduler(tiny_lm, max_rows=8), {0: specs[:1] + beside, 2: specs[1:]})
    for spec in specs:
        assert got[spec.key].token_ids == _naive_contrastive(tiny_lm, spec.prompt_ids, 4, 0.6, 12)
    assert got[0].token_ids != _alone(tiny_lm, _spec(tiny_lm, 0, "Hello there", greedy)).token_ids  # the penalty is live


# --- faults stay with their row ---------------------------------------------------------------


def _eight(tiny_lm, sampled: bool) -> list[RowSpec]:
    rng = random.Random(5)
    return _mixed_specs(tiny_lm, 8, rng, sampled)


def _run_events(sched: Scheduler, specs: list[RowSpec], after_step=None) -> tuple[dict, dict]:
    """Submit `specs`, step until idle (calling `after_step()` after each step): ({key: result}, {key: error})."""
    for spec in specs:
        sched.submit(spec)
    results, failed = {}, {}
    while sched.busy:
        for event in sched.step():
            if isinstance(event, Finished):
                results[event.key] = event.result
            elif isinstance(event, Failed):
                failed[event.key] = event.error
        if after_step is not None:
            after_step()
    return results, failed


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_fault_in_one_row_fails_that_row_alone(tiny_lm, monkeypatch, sampled):
    specs = _eight(tiny_lm, sampled)
    clean, _ = _run_events(Scheduler(tiny_lm, max_rows=8), specs)
    doomed = specs[3].key
    steps = {"n": 0}

    def fault(spec: RowSpec) -> None:
        if spec.key == doomed:
            steps["n"] += 1
            if steps["n"] >= 2:  # mid-decode, inside the step (and on every retry of it)
                raise RuntimeError("injected")

    monkeypatch.setattr(Scheduler, "fault", staticmethod(fault))
    results, failed = _run_events(Scheduler(tiny_lm, max_rows=8), specs)
    assert list(failed) == [doomed] and str(failed[doomed]) == "injected"
    assert set(results) == set(clean) - {doomed}
    for key, result in results.items():
        assert (result.token_ids, result.text, result.finish_reason) == (clean[key].token_ids, clean[key].text, clean[key].finish_reason)


def test_a_row_whose_rules_cannot_be_built_is_refused_at_submit(tiny_lm):
    """A banned word the tokenizer cannot take (settings validation refuses it first; the engine
    must not rely on that) is refused when the row is submitted, before it takes a slot."""
    import dataclasses

    unchecked = dataclasses.replace(GREEDY, ban=("\udfff",))
    sched = Scheduler(tiny_lm, max_rows=4)
    with pytest.raises(Exception):
        sched.submit(RowSpec("x", _spec(tiny_lm, "x", "the sea", GREEDY).prompt_ids, unchecked, 1))
    assert not sched.busy


def test_a_forward_pass_that_fails_is_split_until_only_the_row_that_cannot_run_fails(tiny_lm, monkeypatch):
    """Out of memory for more than three rows at once, and for one prompt whatever its company:
    the batch is retried in parts, every other row finishes with its own tokens."""
    specs = _eight(tiny_lm, False)
    clean, _ = _run_events(Scheduler(tiny_lm, max_rows=8), specs)
    poison = specs[5].prompt_ids
    real = tiny_lm.model.step
    calls = {"failed": 0}

    def step(tokens, slots, prompts, states=False, first=0):
        rows = (0 if tokens is None else len(tokens)) + len(prompts)
        if rows > 3 or poison in prompts:
            calls["failed"] += 1
            raise RuntimeError("out of memory")
        return real(tokens, slots, prompts, states=states, first=first)

    monkeypatch.setattr(tiny_lm.model, "step", step)
    results, failed = _run_events(Scheduler(tiny_lm, max_rows=8), specs)
    assert calls["failed"] > 0
    assert list(failed) == [specs[5].key] and "out of memory" in str(failed[specs[5].key])
    assert set(results) == set(clean) - {specs[5].key}
    for key, result in results.items():
        assert result.token_ids == clean[key].token_ids, key


@pytest.mark.parametrize("quantize", ["none", "int8", "fp16"])
def test_one_running_row_takes_the_lean_step_with_the_batch_steps_logits_bit_for_bit(tiny_lm, quantize, monkeypatch):
    """Batch-1 decoding runs `GPT2._step_one` (no batch bookkeeping); it must give exactly what the
    batch step gives the same row, leave the same keys and values in the cache, and touch only
    its own slot."""
    from aigc_cli.models.gpt2 import GPT2, from_hf_model

    model = tiny_lm.model if quantize == "none" else from_hf_model(tiny_lm.hf_model, quantize=quantize)
    lean_calls = []
    original = GPT2._step_level
    monkeypatch.setattr(GPT2, "_step_level", lambda self, *a: lean_calls.append(a[2]) or original(self, *a))
    tok = tiny_lm.tokenizer
    prompts = [tok.encode("the cat sat on", add_special_tokens=False), tok.encode("he was in the house of his", add_special_tokens=False)]
    lean, full = model.new_slots(), model.new_slots()
    for slots in (lean, full):
        slots.reserve(2, 64)
        logits = model.step(None, slots, prompts)
    tokens = logits.argmax(-1)
    for _ in range(20):
        for row in (1, 0):  # each row steps alone in its own slot; the other stays as it is
            token = tokens[row : row + 1]
            got = model.step(token, lean, [], first=row)
            want = model._step(token, full, [], False, row)
            assert torch.equal(got, want)
            tokens[row] = got[0].argmax()
    assert lean_calls == [1, 0] * 20
    assert lean.lengths == full.lengths
    n = max(full.lengths)
    assert torch.equal(lean.keys[:, :2, :, :n], full.keys[:, :2, :, :n])
    assert torch.equal(lean.v[:, :2, :, :n], full.v[:, :2, :, :n])


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_rows_at_one_position_take_the_level_step_with_the_batch_steps_logits_bit_for_bit(tiny_lm, quantize, monkeypatch):
    """Running rows that stand at one position (the sequences of one prompt, `-n 5`) take
    `GPT2._step_level` too: the same logits to the bit as the batch step, the same keys and values
    in their slots, the slots before `first` untouched. Rows at different positions do not."""
    from aigc_cli.models.gpt2 import GPT2, from_hf_model

    model = tiny_lm.model if quantize == "none" else from_hf_model(tiny_lm.hf_model, quantize=quantize)
    level_calls = []
    original = GPT2._step_level
    monkeypatch.setattr(GPT2, "_step_level", lambda self, *a: level_calls.append(a[0].shape[0]) or original(self, *a))
    tok = tiny_lm.tokenizer
    other = tok.encode("far away", add_special_tokens=False)
    rows = [tok.encode(text, add_special_tokens=False) for text in ("the cat sat on the", "he was in the house", "she said that it was")]
    assert len({len(r) for r in rows}) == 1 and len(other) != len(rows[0])
    level, full = model.new_slots(), model.new_slots()
    for slots in (level, full):
        slots.reserve(4, 64)
        logits = model.step(None, slots, [other, *rows])  # slot 0 stands elsewhere: rows 1-3 step from first=1
    tokens = logits[1:].argmax(-1)
    level_calls.clear()
    for _ in range(12):
        got = model.step(tokens, level, [], first=1)
        want = model._step(tokens, full, [], False, 1)
        assert torch.equal(got, want)
        tokens = got.argmax(-1)
    assert level_calls == [3] * 12
    assert level.lengths == full.lengths and level.lengths[0] == len(other)
    n = max(full.lengths)
    assert torch.equal(level.keys[:, :4, :, :n], full.keys[:, :4, :, :n])
    assert torch.equal(level.v[:, :4, :, :n], full.v[:, :4, :, :n])
    level_calls.clear()
    model.step(torch.cat([tokens[:1], tokens]), level, [], first=0)  # slot 0 is at another position
    assert level_calls == []


@pytest.mark.parametrize("min_rows", [None, 1], ids=["as built", "unpadded"])
def test_a_rows_logits_are_the_same_bits_alone_and_in_a_batch_at_gpt2_width(min_rows, monkeypatch):
    """At GPT-2's own width (768, so a 3,072-wide MLP product), a row decoded alone gets the same
    logits to the bit as the same row stepping among others: oneDNN's one-row kernel sums that
    product in another order than its kernels for more rows, so a lone row is padded to
    PACKED_MIN_ROWS. (Rows of one length: a batch's attention over rows of other lengths adds
    masked positions, which changes a softmax's summation order.) The "unpadded" variant turns the padding off and must show the difference
    (it checks that the test can fail where oneDNN's kernels are the ones measured)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc_cli.models import gpt2

    if min_rows is not None:
        monkeypatch.setattr(gpt2, "PACKED_MIN_ROWS", min_rows)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=500, n_positions=64)).eval()
    model = gpt2.from_hf_model(hf)
    if model.layers[0][7].packed is None:
        pytest.skip("no oneDNN packed kernels in this torch build")
    prompts = [[5, 17, 99, 3], [42, 8, 8, 31], [7, 7, 250, 1]]  # one length: attention reads the same span for each
    alone, together = model.new_slots(), model.new_slots()
    alone.reserve(1, 32)
    together.reserve(3, 32)
    first = model.step(None, alone, prompts[:1])
    model.step(None, together, prompts)
    token = first.argmax(-1)
    differ = 0
    for _ in range(8):
        got = model.step(token, alone, [])
        batch = model.step(torch.stack([token[0], token[0] * 0 + 11, token[0] * 0 + 12]), together, [])
        differ += not torch.equal(got[0], batch[0])
        token = got.argmax(-1)
    if min_rows is None:
        assert differ == 0
    else:
        assert differ > 0


def test_a_lone_row_gets_a_cache_of_its_own_size_and_arrivals_grow_it_in_steps(tiny_lm):
    """The first rows of an empty cache take exactly their slots (a lone 900-token prompt once
    zeroed 8 rows of cache before its first token); rows arriving later grow it in steps."""
    settings = GenerationSettings(decoding="greedy", max_new_tokens=5).resolved()
    sched = Scheduler(tiny_lm, max_rows=16)
    sched.submit(_spec(tiny_lm, "a", "the cat sat on the mat", settings))
    sched.step()
    assert sched.slots.capacity == (1, len(sched.live[0].spec.prompt_ids) + 5)
    sched.submit(_spec(tiny_lm, "b", "he was", settings))
    sched.step()
    assert sched.slots.capacity[0] == 8
    assert set(_drain(sched)) == {"a", "b"}


def test_rows_with_one_prompt_are_prefilled_once_and_each_gets_its_tokens_alone(tiny_lm, monkeypatch):
    """The sequences of one prompt (`-n 5`) and repeated prompts, joining together or mid-decode,
    prefill each distinct prompt once and share its keys and values; every row's tokens are the
    ones it gets alone, whatever its settings and seed."""
    sample = GenerationSettings(decoding="sample", max_new_tokens=10, top_k=0).resolved()
    cooler = GenerationSettings(decoding="sample", max_new_tokens=7, temperature=0.7, repetition_penalty=1.3).resolved()
    same, other = "he was in the house of", "it is"
    specs = [_spec(tiny_lm, f"p{i}", same, sample, seed=i) for i in range(4)]
    specs[2:2] = [_spec(tiny_lm, "q0", other, GREEDY), _spec(tiny_lm, "c", same, cooler), _spec(tiny_lm, "q1", other, cooler)]
    later = [_spec(tiny_lm, "q2", other, GREEDY), _spec(tiny_lm, "r", "for his", sample)]
    later += [_spec(tiny_lm, f"p{i}", same, sample, seed=i) for i in (8, 9)]
    real, prefilled = tiny_lm.model.step, []

    def step(tokens, slots, prompts, states=False, first=0):
        prefilled.extend(tuple(p) for p in prompts)
        return real(tokens, slots, prompts, states=states, first=first)

    monkeypatch.setattr(tiny_lm.model, "step", step)
    results = _drain(Scheduler(tiny_lm, max_rows=16), {0: specs, 3: later})
    ids = {text: tuple(tiny_lm.tokenizer.encode(text, add_special_tokens=False)) for text in (same, other, "for his")}
    assert prefilled == [ids[same], ids[other], ids[other], ids["for his"], ids[same]]  # each once per arrival step
    monkeypatch.setattr(tiny_lm.model, "step", real)
    for spec in specs + later:
        assert results[spec.key].token_ids == _alone(tiny_lm, spec).token_ids, spec.key
    assert len({tuple(results[f"p{i}"].token_ids) for i in range(4)}) == 4  # the seeds really drew apart


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_min_new_tokens_holds_eos_back_as_the_static_loop_does(tiny_lm, decoding, monkeypatch):
    """min_new_tokens holds EOS back for a group of rows in one write, before the processors that
    read each row's tokens: the same tokens as the static loop, which applies transformers'
    processors in their order, for a group (5 rows of one prompt) and for a lone row. The model's
    EOS logit is raised so that EOS would come early."""
    from aigc_cli.engine.decoding import generate_rows

    head, eos = tiny_lm.model.head, tiny_lm.tokenizer.eos_token_id  # every step's and pass's logits come from the head
    monkeypatch.setattr(tiny_lm.model, "head", lambda hidden: head(hidden).index_add(-1, torch.tensor([eos]), torch.full((*hidden.shape[:-1], 1), 8.0)))
    prompt, seeds = "he was in", list(range(5))
    for rows in (5, 1):
        for extra in ({}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}):
            settings = GenerationSettings(decoding=decoding, max_new_tokens=12, min_new_tokens=8, **extra).resolved()
            specs = [RowSpec(i, tiny_lm.tokenizer.encode(prompt, add_special_tokens=False), settings, seeds[i]) for i in range(rows)]
            got = _drain(Scheduler(tiny_lm, max_rows=8), {0: specs})
            static = generate_rows(tiny_lm, [s.prompt_ids for s in specs], settings, seeds[:rows])
            assert [got[i].token_ids for i in range(rows)] == [r.token_ids for r in static], (rows, extra)
            assert all(len(got[i].token_ids) >= 8 for i in range(rows))
    free = GenerationSettings(decoding=decoding, max_new_tokens=12).resolved()  # without the hold, EOS comes early here
    unheld = _drain(Scheduler(tiny_lm, max_rows=8), {0: [RowSpec(i, specs[0].prompt_ids, free, i) for i in range(5)]})
    assert any(len(r.token_ids) < 8 for r in unheld.values())


def test_rows_that_cannot_take_a_copy_of_their_prompt_fail_alone(tiny_lm, monkeypatch):
    """If copying a shared prompt's keys and values fails, the rows that needed the copy fail with
    that error and leave no slot behind; the row that prefilled it and the rows already running
    finish with their own tokens."""
    sample = GenerationSettings(decoding="sample", max_new_tokens=8, top_k=0).resolved()
    running = _spec(tiny_lm, "run", "it is in the", sample)
    first, copies = _spec(tiny_lm, "p0", "he was in", sample, seed=0), [_spec(tiny_lm, f"p{i}", "he was in", sample, seed=i) for i in (1, 2)]
    sched = Scheduler(tiny_lm, max_rows=8)
    real = type(sched.slots).fork

    def fork(self, slot, times):
        real(self, slot, 1)  # one copy made, then out of memory
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(sched.slots), "fork", fork)
    sched.submit(running)
    sched.step()
    sched.step()

    def consistent():
        assert sched.slots.rows == len(sched.live)

    results, failed = _run_events(sched, [first, *copies], consistent)
    assert set(failed) == {"p1", "p2"} and all("out of memory" in str(e) for e in failed.values())
    monkeypatch.setattr(type(sched.slots), "fork", real)
    for spec in (running, first):
        assert results[spec.key].token_ids == _alone(tiny_lm, spec).token_ids, spec.key


# --- one row alone: the scheduler's lone-row step -----------------------------------------------

LONE = {
    "greedy": GREEDY,
    "eos held": GenerationSettings(decoding="greedy", max_new_tokens=20, min_new_tokens=20).resolved(),
    "sampled": GenerationSettings(max_new_tokens=15, top_p=0.9, temperature=0.8).resolved(),
    "processors and stop": GenerationSettings(decoding="greedy", max_new_tokens=15, repetition_penalty=1.3, no_repeat_ngram_size=2, stop=(" zq",)).resolved(),
}


def _all_events(sched: Scheduler, spec: RowSpec) -> list:
    sched.submit(spec)
    events = []
    while sched.busy:
        events += sched.step()
    return events


@pytest.mark.parametrize("settings", LONE.values(), ids=LONE.keys())
def test_a_lone_row_takes_the_lone_step_with_the_general_steps_events(tiny_lm, monkeypatch, settings):
    """Every event (token, text, logprobs, top alternatives, the result) is what the general step
    gives the same row, and the lone step ran."""
    import dataclasses

    spec = dataclasses.replace(_spec(tiny_lm, "a", "he was in the", settings), logprobs=True, top_logprobs=3)
    calls = []
    lone = Scheduler._step_lone
    monkeypatch.setattr(Scheduler, "_step_lone", lambda self: calls.append(1) or lone(self))
    got = _all_events(Scheduler(tiny_lm, max_rows=4), spec)
    monkeypatch.setattr(Scheduler, "_step_lone", Scheduler._step_many)
    want = _all_events(Scheduler(tiny_lm, max_rows=4), spec)
    assert len(calls) >= len(want) - 2 > 0  # every step but the prefill (and the last token's)
    assert got == want


def test_a_fault_in_a_lone_row_fails_it_and_leaves_the_scheduler_idle_and_working(tiny_lm, monkeypatch):
    doomed, seen = _spec(tiny_lm, "doomed", "he was in the", GREEDY), {"n": 0}

    def fault(spec: RowSpec) -> None:
        if spec.key == "doomed":
            seen["n"] += 1
            if seen["n"] == 4:
                raise RuntimeError("injected")

    monkeypatch.setattr(Scheduler, "fault", staticmethod(fault))
    sched = Scheduler(tiny_lm, max_rows=4)
    events = _all_events(sched, doomed)
    assert len(events) >= 2 and all(type(e) is Token for e in events[:-1]) and str(events[-1].error) == "injected"
    assert not sched.busy and sched.logits is None and sched.slots.rows == 0
    after = _spec(tiny_lm, "after", "it is", GREEDY)
    assert _run_events(sched, [after])[0]["after"].token_ids == _alone(tiny_lm, after).token_ids


@pytest.mark.parametrize("failing", ["once", "always"])
def test_a_lone_rows_forward_pass_that_raises_is_retried_then_fails_the_row_alone(tiny_lm, monkeypatch, failing):
    """Out of memory at the lone row's fifth step: raised once, the retry gives the row its clean
    tokens; raised at every try from there, the row fails and the next one runs."""
    spec = _spec(tiny_lm, "a", "he was in the", GREEDY)
    clean = _alone(tiny_lm, spec)
    real, calls = tiny_lm.model.step, {"n": 0, "failed": 0}

    def step(tokens, slots, prompts, states=False, first=0):
        calls["n"] += 1
        if calls["n"] == 5 or (failing == "always" and calls["n"] > 5 and calls["failed"] < 10):
            calls["failed"] += 1
            raise RuntimeError("out of memory")
        return real(tokens, slots, prompts, states=states, first=first)

    monkeypatch.setattr(tiny_lm.model, "step", step)
    sched = Scheduler(tiny_lm, max_rows=4)
    results, failed = _run_events(sched, [spec])
    if failing == "once":
        assert calls["failed"] == 1 and not failed and results["a"].token_ids == clean.token_ids
    else:
        assert not results and "out of memory" in str(failed["a"]) and not sched.busy
        calls["failed"] = 10  # the model works again
        after = _spec(tiny_lm, "after", "it is", GREEDY)
        assert _run_events(sched, [after])[0]["after"].token_ids == _alone(tiny_lm, after).token_ids
