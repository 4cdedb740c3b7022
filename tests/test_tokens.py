"""`aigc score --tokens`: per-token log-probabilities, ranks, entropies and alternatives against
transformers on the same weights, their sum against `aigc score`'s total, GLTR buckets, rendering."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from aigc_cli.apps.tokenview import bucket
from aigc_cli.engine.tokens import token_stats

TINY = ("--model", "tiny-random")
TEXT = "The cat sat on the mat. Emoji 🤖 and café,\nthen a new line  with two spaces."


def _reference(hf_model, seq: list[int], context: int, stride: int) -> dict[int, torch.Tensor]:
    """The Hugging Face perplexity guide's windows, computed by transformers: for each position of
    `seq` that a window scores, the log-softmax that predicts it (keyed by the position in seq)."""
    out: dict[int, torch.Tensor] = {}
    prev_end = 0
    for begin in range(0, len(seq), stride):
        end = min(begin + context, len(seq))
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([seq[begin:end]])).logits[0].float(), -1)
        for t in range(max(prev_end, begin + 1), end):  # the guide's labels: the last end - prev_end, never the first
            out[t] = logp[t - begin - 1]
        prev_end = end
        if end == len(seq):
            break
    return out


@pytest.mark.parametrize("context,stride", [(1024, None), (16, 8), (12, 5), (8, 8)])
def test_token_stats_equal_transformers(tiny_lm, context, stride):
    ids = tiny_lm.tokenizer.encode(TEXT)
    seq = [256, *ids]
    ref = _reference(tiny_lm.hf_model, seq, context, stride or context // 2)
    got = token_stats(tiny_lm.model, ids, 256, context, top=4, stride=stride, batch_size=3)
    assert len(got) == len(ids)
    for i, value in enumerate(got):
        if i + 1 not in ref:
            assert value is None and stride == context  # only a later window's first token goes unscored
            continue
        logp = ref[i + 1]
        logprob, rank, entropy, top = value
        assert logprob == pytest.approx(logp[ids[i]].item(), abs=1e-4)
        # rank by sorting the whole distribution, best first: the position of the token's value
        ordered = sorted(logp.tolist(), reverse=True)
        assert rank == ordered.index(logp[ids[i]].item()) + 1
        assert entropy == pytest.approx(-sum(math.exp(v) * v for v in logp.tolist()), abs=1e-4)
        values, alternatives = logp.topk(4)
        assert [a for a, _ in top] == alternatives.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    if stride != context:
        assert all(v is not None for v in got)


class _TiedModel:
    """A model whose every position gives the same logits, with ties: [1, 3, 3, 2, 3]."""

    device = torch.device("cpu")

    def forward(self, ids, positions, key_mask, cache=None):
        return torch.zeros(*ids.shape, 1)

    def logits(self, hidden):
        return torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]).expand(*hidden.shape[:-1], 5)


def test_tied_tokens_share_the_best_rank():
    got = token_stats(_TiedModel(), [1, 2, 4, 3, 0], 0, context=64, top=0)
    assert [r for _, r, _, _ in got] == [1, 1, 1, 4, 5]
    p = torch.softmax(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), -1)
    assert got[0][2] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def test_buckets():
    assert [bucket(r) for r in (1, 10, 11, 100, 101, 1000, 1001, 50000, None)] == [
        "top10", "top10", "top100", "top100", "top1000", "top1000", "beyond", "beyond", None
    ]


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-zh"])
@pytest.mark.parametrize("extra", [(), ("--stride", "7"), ("--per-line",)])
def test_logprobs_sum_to_scores_total(cli, tmp_path, model, extra):
    f = tmp_path / "t.txt"
    f.write_text("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n" if model.endswith("zh") else TEXT + "\n\nA second line.\n")
    if extra == ("--stride", "7"):  # windows shorter than the text: the built-in models' context is 64
        f.write_text(f.read_text() * 8)
    plain = cli.jsonl("score", str(f), "--model", model, *extra)
    tokens = cli.jsonl("score", str(f), "--model", model, "--tokens", "--top", "3", *extra)
    assert len(plain) == len(tokens) >= 1
    for p, t in zip(plain, tokens):
        assert t.get("line") == p.get("line")
        assert t["token_count"] == p["tokens"] == len(t["tokens"])
        total = sum(x["logprob"] for x in t["tokens"])
        assert total == pytest.approx(-p["nll"] * p["tokens"], rel=1e-5)
        assert t["nll"] == pytest.approx(p["nll"], rel=1e-5) and t["perplexity"] == pytest.approx(p["perplexity"], rel=1e-4)
        assert all(len(x["top"]) == 3 and x["top"][0]["logprob"] >= x["logprob"] - 1e-6 for x in t["tokens"])
        assert sum(t["buckets"].values()) == t["token_count"]
        assert {x["bucket"] for x in t["tokens"]} <= set(t["buckets"])
    text = f.read_text()
    if "--per-line" not in extra:  # the pieces are the text, every character of it (unknown ones too)
        assert "".join(x["token"] for x in tokens[0]["tokens"]) == text


def test_first_token_is_scored_after_the_start_token(cli, tmp_path):
    """[CLS] for the Chinese model (a BERT vocabulary), <|endoftext|> for GPT-2's."""
    from aigc_cli.models.loading import load

    for model, text in [("tiny-random", "Hello world"), ("tiny-random-zh", "春眠不觉晓")]:
        lm = load(model)
        start = lm.tokenizer.cls_token_id if model.endswith("zh") else lm.tokenizer.eos_token_id
        f = tmp_path / "t.txt"
        f.write_text(text)
        (record,) = cli.jsonl("score", str(f), "--model", model, "--tokens")
        ids = [x["id"] for x in record["tokens"]]
        with torch.no_grad():
            logp = torch.log_softmax(lm.hf_model(torch.tensor([[start, *ids]])).logits[0].float(), -1)
        assert record["tokens"][0]["logprob"] == pytest.approx(logp[0, ids[0]].item(), abs=1e-4)


def test_rich_view_has_colours_legend_and_summary(cli, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Hello world.\n")
    r = cli("score", str(f), *TINY, "--tokens", "--format", "rich")
    assert r.exit_code == 0, r.stderr
    assert "GLTR rank" in r.stdout and "top 1,000" in r.stdout and "perplexity" in r.stdout
    assert "\x1b[" in r.stdout and "Hello"[:2] in r.stdout
    r = cli("score", str(f), *TINY, "--tokens", "--format", "rich", env={"NO_COLOR": "1"})
    assert not re.search(r"\x1b\[[0-9;]*(3|4|9|10)[0-9](;|m)", r.stdout)  # no colour at all under NO_COLOR
    assert "\x1b[7m beyond" in r.stdout and "\x1b[4m top 100" in r.stdout  # the buckets as text attributes
    r = cli("score", str(f), *TINY, "--tokens")  # a pipe: one row per token, no ANSI
    assert "\x1b" not in r.stdout
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert rows[0] == ["line", "index", "token", "id", "logprob", "rank", "entropy", "bucket"]
    assert "".join(row[2] for row in rows[1:]) == "Hello world.\\n"


def test_bad_lines_become_error_records(cli, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"Good line.\n\xff\xfe bad\nAnother.\n")
    r = cli("score", str(f), *TINY, "--tokens", "--per-line", "--format", "jsonl")
    assert r.exit_code == 4, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["line"] for x in records] == [1, 2, 3]
    assert records[1]["error"]["code"] == "invalid_utf8" and "tokens" in records[2]
    assert "line 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tokens", "--top", "-1"], "--top"),
        (["--tokens", "--top", "101"], "--top"),
        (["--html", "x.html"], "--html"),
        (["--tokens", "--html", "/no/such/dir/x.html"], "--html"),
    ],
)
def test_usage_errors(cli, args, message):
    r = cli("score", "-", *TINY, *args, input="hello")
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("model,text", [("tiny-random", TEXT), ("tiny-random-zh", "春不闻啼鸟。Hello world 2024, 春")])
def test_decoded_pieces_concatenate_to_the_decoded_text(model, text):
    """Tokenizers without character spans (transformers' own): pieces by incremental decoding; a
    character split over tokens goes with the token that completes it."""
    from aigc_cli.engine.tokens import pieces
    from aigc_cli.models.loading import load

    tok = load(model).tokenizer
    ids = tok.encode(text)
    got = pieces(tok, ids)
    assert len(got) == len(ids) and "".join(got) == tok.decode(ids)
    if model == "tiny-random":
        robot = [p for p in got if "🤖" in p]
        assert robot == [" 🤖"] or robot == ["🤖"]
        assert "\ufffd" not in "".join(got)
