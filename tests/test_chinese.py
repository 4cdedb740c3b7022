"""Chinese GPT-2 models (BERT vocabulary) in every command, on `tiny-random-zh` and on a model
directory laid out like the UER ones (vocab.txt, a special_tokens_map.json without bos or eos, a
config.json whose bos/eos 50256 lie outside the vocabulary), compared with transformers' own
`BertTokenizer` and `GPT2LMHeadModel` on the same files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.serving import InProcessServer, sse_events

CJK_SPACE = re.compile("[\u4e00-\u9fff\uff0c\u3002] [\u4e00-\u9fff\uff0c\u3002]")  # a space between two characters
SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
TEXTS = ["春天的山水很美。", "在寂静的夜晚, 明月照江河", "hello world 2026 春风", "秋月，清风。"]


@pytest.fixture(scope="module")
def uer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory like uer/gpt2-chinese-cluecorpussmall's, small: tiny-random-zh's characters plus
    Latin letters, digits, ASCII punctuation and a few WordPiece words; random GPT-2 weights, except
    that [SEP] is as likely as "。" (its row of the tied head is 1.01 times that one's), so that texts
    end, as a trained model's do."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from aigc_cli.models.tiny import chinese_vocab

    d = tmp_path_factory.mktemp("uer-like")
    vocab = chinese_vocab()
    words = sorted(vocab, key=vocab.__getitem__) + list("abcdefghijklmnopqrstuvwxyz0123456789,.!?")
    words += ["hello", "world", "##s", "##ing", "gpt", "##2", "2026"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (d / "special_tokens_map.json").write_text(json.dumps(specials))
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 128}))
    torch.manual_seed(7)
    config = GPT2Config(vocab_size=len(words), n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight[words.index("[SEP]")] = model.lm_head.weight[words.index("。")] * 1.01
    model.save_pretrained(d)
    assert not (d / "tokenizer.json").exists()
    return d


@pytest.fixture(scope="module")
def reference(uer: Path):
    """transformers' BertTokenizer and GPT2LMHeadModel on the same files."""
    from transformers import BertTokenizer, GPT2LMHeadModel

    return BertTokenizer.from_pretrained(uer), GPT2LMHeadModel.from_pretrained(uer).eval()


def _logprobs(model, ids: list[int]) -> list[float]:
    """log P(ids[k] | ids[:k]) for k >= 1, by transformers."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [float(logits[k - 1, ids[k]]) for k in range(1, len(ids))]


# -- conventions ------------------------------------------------------------------------------------


def test_info_names_the_start_end_and_pad_tokens_and_why(cli, uer):
    r = cli("info", "--model", str(uer))
    assert r.exit_code == 0, r.stderr
    assert "start token: [CLS] (2)" in r.stdout and "end token: [SEP] (3)" in r.stdout and "pad token: [PAD] (0)" in r.stdout
    assert "prompts start with: [CLS]" in r.stdout
    assert "config.json's eos_token_id 50256 is outside the vocabulary" in r.stdout


def test_token_ids_equal_bert_tokenizers(uer, reference):
    from aigc_cli.models.loading import load_tokenizer

    ours, _, conventions = load_tokenizer(str(uer))
    bert, _ = reference
    for text in [*TEXTS, "HELLO Worlds", "春" * 50]:
        assert ours.encode(text) == bert.encode(text, add_special_tokens=False), text
    assert conventions.prefix == (bert.cls_token_id,)


def test_full_and_half_width_punctuation_fits_the_vocabulary():
    """tiny-random-zh has only the full-width comma: one typed half-width is not [UNK]."""
    from aigc_cli.models.tiny import tokenizer

    tok = tokenizer("tiny-random-zh")
    assert tok.encode("春天,山水") == tok.encode("春天，山水") and tok.unk_token_id not in tok.encode("春天,山水")
    assert tok.typed_pieces("春天,山水") == ["春", "天", ",", "山", "水"]  # as typed


def test_decoding_writes_text_as_people_write_it(uer):
    from aigc_cli.models.loading import load_tokenizer

    tok, _, _ = load_tokenizer(str(uer))
    ids = [tok.cls_token_id, *tok.encode("春天 的山水，hello worlds gpt2"), tok.sep_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "春天山水，hello worlds gpt2"  # [UNK] for 的 and the specials are left out
    assert "".join(tok.pieces(ids)) == tok.decode(ids)


# -- every command ----------------------------------------------------------------------------------


def test_score_conditions_the_first_token_on_cls_and_equals_transformers(cli, uer, reference):
    bert, model = reference
    for text in TEXTS:
        r = cli("score", "-", "--model", str(uer), "--format", "jsonl", input=text)
        assert r.exit_code == 0, r.stderr
        got = json.loads(r.stdout)
        ids = [bert.cls_token_id, *bert.encode(text, add_special_tokens=False)]
        want = _logprobs(model, ids)
        assert got["tokens"] == len(want)
        assert got["nll"] == pytest.approx(-sum(want) / len(want), abs=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-random-zh", "uer"])
def test_greedy_generation_equals_transformers_and_stops_at_sep(cli, uer, model, reference):
    import torch

    from aigc_cli.models import tiny

    name = str(uer) if model == "uer" else model
    if model == "uer":
        bert, hf = reference
    else:
        bert, hf = tiny.hf_tokenizer(model), tiny.build_hf(model)[0].eval()
    for prompt in ["在寂静的夜晚", "春风"]:
        rows = cli.jsonl("generate", prompt, "--model", name, "--temperature", "0", "--max-new-tokens", "16")
        ids = [bert.cls_token_id, *bert.encode(prompt, add_special_tokens=False)]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=bert.sep_token_id, pad_token_id=bert.pad_token_id)
        new = out[0, len(ids) :].tolist()
        ended = bert.sep_token_id in new
        from aigc_cli.models.loading import load_tokenizer

        ours, _, _ = load_tokenizer(name)
        assert rows[0]["text"] == ours.decode(new[: new.index(bert.sep_token_id)] if ended else new)
        assert rows[0]["finish_reason"] == ("eos" if ended else "length")
        assert not CJK_SPACE.search(rows[0]["text"]) and not any(s in rows[0]["text"] for s in SPECIALS)


def test_sampled_generation_ends_at_sep_and_shows_no_special_token(cli, uer):
    """[SEP] ends a text: over 24 long sampled sequences some end there, early, never showing it."""
    rows = cli.jsonl("generate", "春天", "--model", str(uer), "-n", "24", "--max-new-tokens", "120", "--seed", "5", "--temperature", "1.5")
    ended = [r for r in rows if r["finish_reason"] in ("eos", "stop")]
    assert ended, [r["finish_reason"] for r in rows]
    assert all(r["completion_tokens"] < 120 for r in ended)
    assert not any(s in r["text"] for r in rows for s in SPECIALS)


def test_generate_files_jsonl_and_resume(cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in enumerate(["春天", "秋月", "", "山水"])))
    out = tmp_path / "out.jsonl"
    args = ("generate", "-f", str(src), "--model", "tiny-random-zh", "--seed", "1", "--max-new-tokens", "6", "-o", str(out))
    r = cli(*args)
    assert r.exit_code == 4, r.stderr  # the empty prompt
    whole = out.read_text()
    lines = whole.splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")
    assert cli(*args, "--resume").exit_code == 4
    assert out.read_text() == whole
    assert [json.loads(x).get("error", {}).get("code") for x in lines] == [None, None, "empty_prompt", None]


def test_poem_on_a_uer_like_directory(cli, uer):
    r = cli("poem", "春天", "--model", str(uer), "--form", "wujue", "--seed", "3")
    assert r.exit_code == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x and not x.startswith("---")]
    assert len(lines) == 4 and all(len(x) == 6 for x in lines), lines  # 5 characters and a mark
    check = cli("poem", "--check", "-", "--form", "wujue", "--model", str(uer), input="\n".join(lines) + "\n")
    assert "Traceback" not in check.stderr


def test_recommend_and_its_evaluation_on_chinese_models(cli, uer, tmp_path):
    for name in ("tiny-random-zh", str(uer)):
        rows = cli.jsonl("recommend", "春天 山水", "--catalog", "sample", "-k", "3", "--model", name)
        assert len(rows) == 3 and all(math.isfinite(r["score"]) for r in rows)
        metrics = cli.jsonl("recommend", "--catalog", "sample", "--eval", "sample", "-k", "3", "--model", name)
        assert metrics and all("users" in m for m in metrics)


def test_finetune_frames_documents_and_the_result_loads_in_transformers(cli, uer, tmp_path):
    import torch
    from transformers import BertTokenizer, GPT2LMHeadModel

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("春天的山水很美。\n秋月照江河，风起云飞。\n" * 8, encoding="utf-8")
    out = tmp_path / "ft"
    r = cli("finetune", str(corpus), "--model", str(uer), "-o", str(out), "--epochs", "1")
    assert r.exit_code == 0, r.stderr
    assert "bos_token_id must be" not in r.stderr  # transformers' complaint about 50256 is not shown
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    again = cli.jsonl("generate", "春天, hello", "--model", str(out), "--max-new-tokens", "12", "--seed", "2")
    assert not CJK_SPACE.search(again[0]["text"]) and not any(s in again[0]["text"] for s in SPECIALS)  # aigc's own tokenizer
    tok, model = BertTokenizer.from_pretrained(out), GPT2LMHeadModel.from_pretrained(out)
    ids = tok("春天", return_tensors="pt").input_ids[:, :-1]  # [CLS] 春 天
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]


def test_finetune_frames_each_document_with_cls_and_sep():
    from aigc_cli.models.conventions import document_frame
    from aigc_cli.models.loading import load_tokenizer

    tok, _, _ = load_tokenizer("tiny-random-zh")
    assert document_frame(tok) == ([tok.cls_token_id], [tok.sep_token_id])
    gpt2, _, _ = load_tokenizer("tiny-random")
    assert document_frame(gpt2) == ([], [gpt2.eos_token_id])


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(uer, tmp_path_factory):
    template = "{% for m in messages %}{{ m.role }}：{{ m.content }}\n{% endfor %}assistant："
    s = InProcessServer(str(uer), chat_template=template)
    yield s
    s.stop()


def _post(server, path: str, body: dict):
    status, _, data = server.raw("POST", path, body, {"Content-Type": "application/json"})
    return status, data


def test_server_echo_logprobs_equal_transformers_and_show_the_text_as_typed(server, uer, reference):
    bert, model = reference
    prompt = "春天的山水, hello world"
    status, data = _post(server, "/v1/completions", {"model": str(uer), "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2})
    assert status == 200, data
    choice = json.loads(data)["choices"][0]
    lp = choice["logprobs"]
    ids = [bert.cls_token_id, *bert.encode(prompt, add_special_tokens=False)]
    assert lp["tokens"][: len(ids)] == ["[CLS]", "春", "天", "的", "山", "水", ",", " hello", " world"]  # [UNK] shown as typed
    want = _logprobs(model, ids)
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
    text = choice["text"]
    assert text.startswith(prompt)
    for token, at in zip(lp["tokens"][1:], lp["text_offset"][1:]):
        assert text[at : at + len(token)] == token  # offsets point into the text
    status, data = _post(server, "/tokenize", {"model": str(uer), "prompt": prompt})
    assert json.loads(data)["tokens"] == ids  # [CLS] first, no [SEP]: what the model sees


def test_server_stream_equals_the_final_text_and_the_cli(server, uer, cli):
    body = {"model": str(uer), "prompt": "明月, hello", "max_tokens": 12, "temperature": 0}
    _, whole = _post(server, "/v1/completions", body)
    _, streamed = _post(server, "/v1/completions", {**body, "stream": True})
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == json.loads(whole)["choices"][0]["text"]
    local = cli.jsonl("generate", "明月, hello", "--model", str(uer), "--temperature", "0", "--max-new-tokens", "12")
    assert local[0]["text"] == text
    usage = json.loads(whole)["usage"]
    _, tokenized = _post(server, "/tokenize", {"model": str(uer), "prompt": "明月, hello"})
    assert usage["prompt_tokens"] == json.loads(tokenized)["count"]


def test_server_chat_with_a_template(server, uer):
    status, data = _post(server, "/v1/chat/completions", {"model": str(uer), "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0})
    assert status == 200, data
    content = json.loads(data)["choices"][0]["message"]["content"]
    assert not CJK_SPACE.search(content) and not any(s in content for s in SPECIALS)


def test_generate_through_the_server_equals_a_local_run(server, uer, cli, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("在寂静的夜晚\n春风, hello\n", encoding="utf-8")
    args = ("generate", "-f", str(src), "--seed", "4", "--max-new-tokens", "8", "--format", "jsonl")
    here = cli(*args, "--model", str(uer))
    there = cli(*args, "--server", server.url)
    assert here.exit_code == there.exit_code == 0, there.stderr
    strip = lambda out: [{k: v for k, v in json.loads(x).items() if k not in ("model", "revision")} for x in out.splitlines()]  # noqa: E731
    assert strip(there.stdout) == strip(here.stdout)


def test_a_vocabulary_without_start_or_end_tokens_is_refused_naming_it(cli, uer, tmp_path):
    import shutil

    d = tmp_path / "no-cls"
    shutil.copytree(uer, d)
    words = [w for w in (d / "vocab.txt").read_text(encoding="utf-8").split("\n") if w not in ("[CLS]", "[SEP]")]
    (d / "vocab.txt").write_text("\n".join(words), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]", "pad_token": "[PAD]"}))
    for args in (("score", "-"), ("generate", "春天")):
        r = cli(*args, "--model", str(d), input="春天")
        assert r.exit_code == 3, r.stderr
        assert f"{d}: the tokenizer defines no start token" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) <= 2


def test_a_prompt_ending_in_whitespace_gets_no_space_before_the_completion(server, uer, reference):
    """WordPiece drops a prompt's trailing newline: the completion must not put a space back, and
    the echoed tokens cover the whole prompt, as typed, in the streamed and the whole answer."""
    bert, _ = reference
    for prompt in ("hello\n", "春天的 hello world"):  # (的 is [UNK], shown as typed)
        body = {"model": str(uer), "prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
        _, whole = _post(server, "/v1/completions", body)
        choice = json.loads(whole)["choices"][0]
        _, streamed = _post(server, "/v1/completions", {**body, "stream": True})
        events = [e for e in sse_events(streamed) if e != "[DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == choice["text"]
        offsets = [o for e in events if e["choices"] and e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"]
        completion = choice["text"][len(prompt) :]
        assert completion[:1] != " " or not prompt[-1].isspace(), repr(choice["text"])
        lp = choice["logprobs"]
        for k, (token, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])):
            if top is not None:
                assert token in top, (k, token, top)  # the chosen token keyed as it is shown
        n = len(bert.encode(prompt, add_special_tokens=False)) + 1
        assert all(list(top) == [token] for token, top in zip(lp["tokens"][n:], lp["top_logprobs"][n:]))  # greedy: the top-1 is the chosen, once


def test_a_large_body_prepared_in_the_helper_process_gets_the_prefix_too(server, uer):
    """Bodies over 64 KiB are tokenized in the server's helper process: [CLS] first there too."""
    text = "春风" * 40000  # 240 KB of UTF-8
    status, data = _post(server, "/tokenize", {"model": str(uer), "prompt": text})
    assert status == 200, data
    tokens = json.loads(data)["tokens"]
    assert tokens[0] == 2 and len(tokens) == 80001 and 3 not in tokens


# -- defaults on GPT-2's context ------------------------------------------------------------------


@pytest.fixture(scope="module")
def uer1024(uer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The UER-layout directory with GPT-2's 1,024-token context (the real UER models' too)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("uer-1024")
    for name in ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(uer / name, d / name)
    words = (d / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    torch.manual_seed(8)
    config = GPT2Config(vocab_size=len(words), n_positions=1024, n_embd=64, n_layer=2, n_head=4, bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(d)
    return d


def test_generate_with_defaults_fills_the_context_counting_cls(cli, uer1024, tmp_path):
    """Defaults (50 new tokens): a prompt of 973 characters plus [CLS] and 50 new tokens is exactly
    1,024 and runs; one character more is that record's prompt_too_long. (Every setting is the
    default but the seed: unseeded, this random model's 239-token vocabulary ended the text at
    [SEP] within 50 tokens for 1 seed of 30, and failed a full run so.)"""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": "春" * n}) + "\n" for n in (973, 974)), encoding="utf-8")
    r = cli("generate", "-f", str(src), "--model", str(uer1024), "--seed", "1")
    assert r.exit_code == 4, r.stderr
    fits, too_long = (json.loads(x) for x in r.stdout.splitlines())
    assert fits["completion_tokens"] == 50 and fits["prompt_tokens"] == 974, fits
    assert too_long["error"]["code"] == "prompt_too_long" and "975 tokens" in too_long["error"]["message"]


def test_score_and_token_views_with_defaults_past_the_context(cli, uer1024):
    """A text of 3,000 characters: score's default sliding windows over the 1,024-token context,
    and --tokens' log-probabilities summing to score's total."""
    text = ("春风吹绿江南岸，明月何时照我还。" * 200)[:3000]
    whole = json.loads(cli("score", "-", "--model", str(uer1024), "--format", "jsonl", input=text).stdout)
    assert whole["tokens"] == 3000
    view = json.loads(cli("score", "-", "--tokens", "--model", str(uer1024), "--format", "jsonl", input=text).stdout)
    assert "".join(t["token"] for t in view["tokens"]) == text
    total = sum(t["logprob"] for t in view["tokens"] if t["logprob"] is not None)
    assert -total / whole["tokens"] == pytest.approx(whole["nll"], rel=1e-5)


def test_finetune_with_its_default_block_on_long_chinese_documents(cli, uer1024, tmp_path):
    """No --block-size: blocks of the model's whole context, each [CLS] doc [SEP] framed; every
    window fits (a 2,500-character document is cut into blocks)."""
    corpus = tmp_path / "long.txt"
    corpus.write_text(("山水清明，春风万里。" * 250) + "\n\n" + ("秋月照江河，孤舟夜行。" * 200) + "\n", encoding="utf-8")
    out = tmp_path / "ft"
    r = cli("finetune", str(corpus), "--model", str(uer1024), "-o", str(out), "--steps", "2")
    assert r.exit_code == 0, r.stderr
    assert "of up to 1024 tokens" in r.stderr, r.stderr
    again = cli.jsonl("generate", "春天", "--model", str(out), "--max-new-tokens", "8")
    assert not CJK_SPACE.search(again[0]["text"])


def test_the_sequences_of_one_prompt_share_its_prefill_at_the_full_context(cli, uer1024):
    """`-n 3` with the default 50 new tokens on a prompt that fills the 1,024-token context with them:
    the three sequences share one prefill of the prompt, and each is what it is when the rows run one
    at a time (`--batch-size 1`: each row prefills the prompt itself)."""
    args = ("generate", ("春风吹绿江南岸明月何时照我还" * 70)[:973], "-n", "3", "--model", str(uer1024), "--seed", "1", "--format", "jsonl")
    shared, alone = cli(*args), cli(*args, "--batch-size", "1")
    assert shared.exit_code == 0 and alone.exit_code == 0, shared.stderr + alone.stderr
    rows = [json.loads(x) for x in shared.stdout.splitlines()]
    assert [r["text"] for r in rows] == [json.loads(x)["text"] for x in alone.stdout.splitlines()]
    assert [r["prompt_tokens"] for r in rows] == [974] * 3  # [CLS] and 973 characters
    assert max(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == 1024
    assert len({r["text"] for r in rows}) == 3


def test_beam_search_prefills_once_and_equals_transformers_at_the_full_context(uer1024):
    """Beam search (its default 4 beams, the default 50 new tokens) on a prompt that fills the
    1,024-token context with them: the prompt is prefilled once for every beam, and the beams are
    transformers' `generate` on the same weights and token ids."""
    import torch
    from transformers import GPT2LMHeadModel

    from aigc_cli.core.settings import Decoding, GenerationSettings
    from aigc_cli.engine.engine import Engine, Request

    engine = Engine.load(str(uer1024))
    settings = GenerationSettings(decoding=Decoding.beam).resolved()
    prompt = ("春风吹绿江南岸明月何时照我还" * 70)[:973]
    ids = engine.encode(prompt, settings)
    assert len(ids) + settings.max_new_tokens == 1024
    ours = [c.token_ids for c in engine.generate([Request(0, prompt, settings, 1)])]
    hf = GPT2LMHeadModel.from_pretrained(uer1024).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=settings.num_beams,
                          max_new_tokens=50, pad_token_id=0, eos_token_id=engine.tokenizer.eos_token_id)
    theirs = out[0, len(ids) :].tolist()
    eos = engine.tokenizer.eos_token_id
    assert ours == [theirs[: theirs.index(eos)] if eos in theirs else theirs]


def test_int8_row_kernels_at_the_full_context(uer1024, monkeypatch):
    """`--quantize int8` with its compiled row kernels (models/fused.py) on a Chinese prompt that
    fills the 1,024-token context over 50 steps of three rows: the level step and the batch step
    give the same bits at every position up to 1,023, and both stay within int8's noise of the same
    model on torch's own ops (fed the same tokens)."""
    import torch

    from aigc_cli.models import fused
    from aigc_cli.models.gpt2 import load_gpt2

    model = load_gpt2(uer1024, quantize="int8")
    assert model is not None
    if fused._compiler() is None:
        pytest.skip("no C compiler: int8 runs torch's ops")
    assert model.rowops is not None
    monkeypatch.setenv("AIGC_FUSED", "0")  # the same model on torch's own ops
    fused.row_ops.cache_clear()
    try:
        torch_ops = load_gpt2(uer1024, quantize="int8")
    finally:
        monkeypatch.delenv("AIGC_FUSED")
        fused.row_ops.cache_clear()
    assert torch_ops is not None and torch_ops.rowops is None
    prompt = [2] + [int(t) for t in torch.randint(5, 200, (973,), generator=torch.Generator().manual_seed(3))]
    caches = {name: m.new_slots() for name, m in (("level", model), ("batch", model), ("torch", torch_ops))}
    for name, slots in caches.items():
        slots.reserve(3, 1024)
        logits = (torch_ops if name == "torch" else model).step(None, slots, [prompt] * 3)
    tokens = logits.argmax(-1) + torch.tensor([0, 1, 2])  # three rows apart from the first step on
    worst = 0.0
    for _ in range(50):
        level = model.step(tokens, caches["level"], [])
        batch = model._step(tokens, caches["batch"], [], False, 0)
        plain = torch_ops.step(tokens, caches["torch"], [])
        assert torch.equal(level, batch)
        worst = max(worst, ((level - plain).abs().max() / plain.abs().max()).item())
        tokens = level.argmax(-1)
    assert caches["level"].lengths == [1024] * 3
    assert worst < 1e-2, worst  # measured 2e-7: no activation crossed an int8 rounding boundary


def test_generate_int8_with_defaults_fills_the_context(cli, uer1024):
    """`generate --quantize int8 -n 3` with every other setting at its default (50 new tokens) on a
    prompt that fills the 1,024-token context with them: the int8 row kernels decode the three
    sequences to the end of the context."""
    args = ("generate", ("春风吹绿江南岸明月何时照我还" * 70)[:973], "-n", "3", "--quantize", "int8", "--model", str(uer1024), "--seed", "1", "--format", "jsonl")
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["prompt_tokens"] for row in rows] == [974] * 3  # [CLS] and 973 characters
    assert max(row["prompt_tokens"] + row["completion_tokens"] for row in rows) == 1024  # (a row may end at [SEP])
    assert not CJK_SPACE.search(rows[0]["text"])


@pytest.fixture(scope="module")
def uer1024_sep(uer1024: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uer1024 with [SEP]'s (tied) embedding set to 1.01 x that of 寒, which greedy decoding of
    the prompt below reaches: [SEP] then wins wherever 寒 would, so greedy texts end early."""
    import shutil

    import torch
    from transformers import BertTokenizer, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("uer-1024-sep")
    for name in ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(uer1024 / name, d / name)
    bert, hf = BertTokenizer.from_pretrained(uer1024), GPT2LMHeadModel.from_pretrained(uer1024)
    with torch.no_grad():
        table = hf.transformer.wte.weight
        table[bert.sep_token_id] = table[bert.convert_tokens_to_ids("寒")] * 1.01
    hf.save_pretrained(d)
    return d


@pytest.mark.parametrize("more", [(), ("--min-new-tokens", "50")], ids=["defaults", "EOS held back"])
def test_greedy_generate_with_defaults_fills_the_context_as_transformers(cli, uer1024_sep, more):
    """`generate --temperature 0` (greedy; 50 new tokens by default) on a prompt that fills the
    1,024-token context with them, on a model whose greedy text reaches [SEP]: the same text as
    transformers' greedy `generate` on the same weights, ended at [SEP]; with `--min-new-tokens
    50`, [SEP] held back to the end of the context (the scheduler masks it only in a row where it
    won, then takes that row's next best)."""
    import torch
    from transformers import BertTokenizer, GPT2LMHeadModel

    from aigc_cli.models.loading import load_tokenizer

    model = uer1024_sep
    bert, hf = BertTokenizer.from_pretrained(model), GPT2LMHeadModel.from_pretrained(model).eval()
    ours, _, _ = load_tokenizer(str(model))
    prompt = ("春风吹绿江南岸明月何时照我还" * 70)[:973]
    rows = cli.jsonl("generate", prompt, "--temperature", "0", "--model", str(model), *more)
    ids = [bert.cls_token_id, *bert.encode(prompt, add_special_tokens=False)]
    assert len(ids) == 974 and rows[0]["prompt_tokens"] == 974
    held = {"min_new_tokens": 50} if more else {}
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False, eos_token_id=bert.sep_token_id, pad_token_id=bert.pad_token_id, **held)
    new = out[0, len(ids) :].tolist()
    ended = bert.sep_token_id in new
    assert ended != bool(more)  # the model's text reaches [SEP] unless it is held back
    assert rows[0]["text"] == ours.decode(new[: new.index(bert.sep_token_id)] if ended else new)
    assert rows[0]["finish_reason"] == ("eos" if ended else "length")
    if more:
        assert rows[0]["completion_tokens"] == 50 and len(ids) + 50 == 1024
