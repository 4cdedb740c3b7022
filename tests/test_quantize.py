"""Fast mode (--quantize int8|fp16): kernels against naive computations, the model against float32,
every command and decoding mode working on it, provenance and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aigc_cli.models.gpt2 import from_hf_model
from aigc_cli.apps.poetics import FORMS, check
from aigc_cli.models.quantize import Fp16Linear, Int8Linear, int8_rows
from aigc_cli.core.settings import Decoding
from aigc_cli.core.settings import GenerationSettings as S


def test_int8_linear_equals_a_naive_dequantized_computation():
    """fbgemm's int8 kernel == per-row int8 weights and a per-call 7-bit affine activation
    quantization, computed by hand in float32; and it is really quantized (differs from float32)."""
    torch.manual_seed(0)
    w, b, x = torch.randn(64, 96) * 0.05, torch.randn(96) * 0.1, torch.randn(5, 64)
    q, scale = int8_rows(w.t().contiguous())
    assert q.dtype == torch.int8 and q.abs().max() == 127
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    step = (hi - lo) / 127
    zero = round(-lo / step)
    xq = (torch.clamp(torch.round(x / step) + zero, 0, 127) - zero) * step
    naive = xq @ (q.float() * scale[:, None]).t() + b
    got = Int8Linear(q, scale, b)(x)
    assert torch.allclose(got, naive, atol=1e-5)
    assert (got - (x @ w + b)).abs().max() > 1e-3


def test_fp16_linear_is_float16_weights_in_float32_arithmetic():
    torch.manual_seed(1)
    w, b, x = torch.randn(64, 96) * 0.05, torch.randn(96) * 0.1, torch.randn(7, 64)
    got = Fp16Linear(w, b)(x)
    assert torch.allclose(got, x @ w.half().float() + b, atol=1e-5)
    assert (got - (x @ w + b)).abs().max() > 1e-6


@pytest.fixture(scope="module")
def models(tiny_lm):
    hf = tiny_lm.hf_model
    return {mode: from_hf_model(hf, quantize=mode) for mode in ("none", "int8", "fp16")}


def test_quantized_logits_stay_close_to_float32(tiny_lm, models):
    ids = torch.tensor([tiny_lm.tokenizer.encode("Hello, how are you? The night is dark and full of stars")])
    with torch.no_grad():
        ref = models["none"](ids).logits
        err = {m: (models[m](ids).logits - ref).abs().max().item() / ref.std().item() for m in ("int8", "fp16")}
    assert 0 < err["fp16"] < 0.01
    assert err["fp16"] < err["int8"] < 0.15


def test_quantized_models_keep_no_float32_token_table(models):
    assert models["none"].wte.dtype == torch.float32
    for mode in ("int8", "fp16"):
        assert not hasattr(models[mode], "wte")
        assert models[mode].embed.table.dtype == {"int8": torch.int8, "fp16": torch.float16}[mode]
    emb = models["int8"].embed(torch.arange(10))
    assert torch.allclose(emb, models["none"].wte[:10], atol=models["int8"].embed.scale[:10].max().item())


@pytest.fixture(scope="module")
def int8_engine():
    from aigc_cli.engine.engine import Engine

    return Engine.load("tiny-random", quantize="int8")


@pytest.mark.parametrize("decoding", ["greedy", "sample", "beam", "contrastive"])
def test_every_decoding_mode_runs_quantized(int8_engine, decoding):
    from aigc_cli.engine.engine import Request

    n = 1 if decoding in ("greedy", "contrastive") else 2
    beams = {"num_beams": 3} if decoding == "beam" else {}
    settings = S(decoding=Decoding(decoding), num_sequences=n, max_new_tokens=12, **beams).resolved()
    reqs = [Request(i, p, settings, 7) for i, p in enumerate(["Hello, how are you?", "The"])]
    outs = list(int8_engine.generate(reqs, batch_size=4))
    assert [(c.id, c.index) for c in outs] == [(i, j) for i in range(2) for j in range(n)]
    tok = int8_engine.tokenizer
    for c in outs:
        assert c.finish_reason in ("length", "eos"), c
        assert (len(c.token_ids) == 12) == (c.finish_reason == "length") and c.token_ids, c
        assert c.text == tok.decode(c.token_ids, clean_up_tokenization_spaces=False)
        assert tok.eos_token_id not in c.token_ids
    if n > 1:  # distinct sequences per prompt
        assert outs[0].token_ids != outs[1].token_ids


def test_greedy_agreement_and_perplexity_against_float32(cli, tiny_dir):
    """The two measures of the quality cost: greedy tokens shared with float32, perplexity change."""
    text = "Once upon a time, in a land far away, there lived a king who loved the sea and the stars."
    greedy = {}
    for mode in ("none", "int8", "fp16"):
        rec = cli.jsonl("generate", text, "-m", str(tiny_dir), "--quantize", mode, "--decoding", "greedy", "--max-new-tokens", "40")
        greedy[mode] = rec[0]["text"]
    assert greedy["fp16"] == greedy["none"]
    ppl = {}
    for mode in ("none", "int8", "fp16"):
        result = cli("score", "-", "-m", str(tiny_dir), "--quantize", mode, "--format", "jsonl", input=text)
        assert result.exit_code == 0, result.stderr
        ppl[mode] = json.loads(result.stdout)["perplexity"]
    assert abs(math.log(ppl["int8"] / ppl["none"])) < 0.05
    assert abs(math.log(ppl["fp16"] / ppl["none"])) < 0.001


@pytest.mark.parametrize("model, form", [("tiny-random", "limerick"), ("tiny-random-zh", "wujue")])
def test_poem_form_holds_quantized(model, form):
    from aigc_cli.engine.engine import Engine
    from aigc_cli.apps.poem import write_poems
    from aigc_cli.apps.prompts import load_prompt

    engine = Engine.load(model, quantize="int8")
    settings = S(num_sequences=2, seed=5).resolved()
    template = load_prompt(f"poem-{FORMS[form].language}.txt", "-")
    for poem in write_poems(engine, "the sea", FORMS[form], settings, 3, template, None):
        assert check(poem.text, FORMS[form]).ok, poem.text


def test_revision_names_the_precision_and_resume_refuses_to_mix(cli, tmp_path):
    out = tmp_path / "out.jsonl"
    recs = cli.jsonl("generate", "Hi", "-m", "tiny-random", "--quantize", "fp16", "--max-new-tokens", "4")
    assert recs[0]["revision"] == "builtin+fp16"
    assert cli("generate", "Hi", "-m", "tiny-random", "--max-new-tokens", "4", "-o", str(out)).exit_code == 0
    again = cli("generate", "Hi", "-m", "tiny-random", "--quantize", "int8", "--max-new-tokens", "4", "-o", str(out), "--resume")
    assert again.exit_code == 2 and "--resume" in again.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--quantize", "int4"], "--quantize"),
        (["--quantize", "int8", "--dtype", "bfloat16"], "--quantize int8"),
    ],
)
def test_bad_quantize_flags(cli, args, words):
    result = cli("generate", "Hi", "-m", "tiny-random", *args)
    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_int8_weights_are_cached_for_the_next_run(tiny_dir, monkeypatch, tmp_path):
    """The first int8 load stores its int8 weights; the next one reads them and quantizes nothing."""
    import os

    from aigc_cli.models import quantize as q8
    from aigc_cli.models.gpt2 import load_gpt2

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    first = load_gpt2(tiny_dir, quantize="int8")
    stored = list((tmp_path / "aigc" / "int8").glob("*.safetensors"))
    assert len(stored) == 1

    def refuse(*_):
        raise AssertionError("quantized again although the cache holds the weights")

    monkeypatch.setattr(q8, "int8_rows", refuse)
    monkeypatch.setattr(q8, "int8_table", refuse)
    second = load_gpt2(tiny_dir, quantize="int8")
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    weights = tiny_dir / "model.safetensors"  # a changed checkpoint is another cache entry
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="quantized again"):
        load_gpt2(tiny_dir, quantize="int8")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
