"""`aigc score` and `aigc recommend`: log-probabilities against direct computations, PMI, metrics, loaders."""

from __future__ import annotations

import json
import math
import random
from string import Template
from types import SimpleNamespace

import pytest
import torch

from aigc_cli.engine.engine import Engine
from aigc_cli.core.errors import UsageError
from aigc_cli.apps.recommend import Item, Profile, Prompts, ScoreKind, load_catalog, load_eval, metrics, rank
from aigc_cli.engine.scoring import continuation_logprobs, perplexity, sliding_windows

TINY = ("--model", "tiny-random")


def _direct(model, ctx, cont):
    """One row, no padding, no batching."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return [logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)]


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batched_logprobs_equal_one_at_a_time(tiny_lm, batch_size):
    rng = random.Random(0)
    pairs = [
        ([256] + [rng.randrange(256) for _ in range(rng.randrange(1, 12))], [rng.randrange(256) for _ in range(rng.randrange(1, 15))])
        for _ in range(19)
    ]
    got = continuation_logprobs(tiny_lm.model, pairs, batch_size=batch_size, pad_id=256)
    for (ctx, cont), row in zip(pairs, got):
        assert row == pytest.approx(_direct(tiny_lm.model, ctx, cont), abs=1e-5)


def test_perplexity_of_a_short_text_equals_direct_computation(tiny_lm):
    ids = tiny_lm.tokenizer.encode("The cat sat on the mat.")
    result = perplexity(tiny_lm.model, ids, 256, context=1024)  # 256 is <|endoftext|>
    direct = _direct(tiny_lm.model, [256], ids)
    assert result.tokens == len(ids)  # every token, the first conditioned on BOS
    assert result.nll == pytest.approx(-sum(direct) / len(ids), abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.nll))


def test_stride_equal_to_context_is_non_overlapping_chunks(tiny_lm):
    ids = tiny_lm.tokenizer.encode("Sliding windows over a text longer than the context!")
    seq, ctx = [256, *ids], 8
    by_hand = []
    for start in range(0, len(seq), ctx):
        chunk = seq[start : start + ctx]
        if len(chunk) > 1:
            by_hand += _direct(tiny_lm.model, chunk[:1], chunk[1:])
    result = perplexity(tiny_lm.model, ids, 256, context=ctx, stride=ctx)
    assert result.tokens == len(by_hand)
    assert result.nll == pytest.approx(-sum(by_hand) / len(by_hand), abs=1e-6)


def test_default_stride_matches_the_hugging_face_guide_loop(tiny_lm):
    """The perplexity guide's loop with labels=-100 masking, computed by transformers' own loss."""
    ids = tiny_lm.tokenizer.encode("A longer text, so that several overlapping windows are needed here.")
    seq = torch.tensor([[256, *ids]])
    ctx, stride = 16, 8
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + ctx, seq.size(1))
        trg_len = end - prev_end
        window = seq[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = tiny_lm.hf_model(window, labels=labels).loss
        n_valid = int((labels[:, 1:] != -100).sum())
        total += loss.item() * n_valid
        count += n_valid
        prev_end = end
        if end == seq.size(1):
            break
    result = perplexity(tiny_lm.model, ids, 256, context=ctx, stride=stride)
    assert result.tokens == count == len(ids)
    assert result.nll == pytest.approx(total / count, abs=1e-5)


def test_sliding_windows_score_each_token_once():
    for n, ctx, stride in [(50, 16, 8), (50, 16, 16), (10, 16, 8), (33, 7, 3)]:
        scored = [t for _, end, first in sliding_windows(n, ctx, stride) for t in range(first, end)]
        assert len(scored) == len(set(scored))
        assert all(end - begin <= ctx for begin, end, _ in sliding_windows(n, ctx, stride))
        if stride < ctx:
            assert scored == list(range(1, n))


CATALOG = [
    Item("a", "Football match report"),
    Item("b", "New phone chip"),
    Item("c", "Pasta recipe with tomatoes and basil"),
    Item("d", "Stock markets rise"),
    Item("e", "X"),
]


def test_pmi_is_zero_when_user_prompt_equals_neutral(tiny_lm):
    prompts = Prompts(user=Template("Here is a headline:"), neutral="Here is a headline:", liked=Template("$liked"))
    ranked = rank(Engine(tiny_lm), CATALOG, Profile(interests=["sports", "cooking"]), prompts)
    assert [r.score for r in ranked] == [0.0] * len(CATALOG)
    assert [r.item.id for r in ranked] == [i.id for i in CATALOG]


def test_shuffling_the_catalog_changes_no_score(tiny_lm):
    prompts = Prompts.load()
    user = Profile(interests=["sports", "food"])
    first = {r.item.id: r.score for r in rank(Engine(tiny_lm), CATALOG, user, prompts, batch_size=3)}
    shuffled = CATALOG[::-1][2:] + CATALOG[::-1][:2]
    second = {r.item.id: r.score for r in rank(Engine(tiny_lm), shuffled, user, prompts, batch_size=2)}
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == pytest.approx(second[key], abs=1e-5)


class _EchoModel:
    """A fake model backend that raises the probability of tokens already in its input: a user who
    mentions a word likes items with it. Its "hidden states" are already logits."""

    continuous = False
    device = torch.device("cpu")

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def forward(self, input_ids, positions, key_mask, cache=None):
        bsz, width = input_ids.shape
        logits = torch.zeros(bsz, width, self.vocab_size)
        for b in range(bsz):
            for t in range(width):
                logits[b, t, input_ids[b, : t + 1]] = 4.0
        return logits

    def logits(self, hidden):
        return hidden


@pytest.mark.parametrize("kind", [ScoreKind.pmi, ScoreKind.loglik, ScoreKind.mean])
def test_direction_matching_item_ranks_first(tiny_lm, kind):
    engine = Engine(SimpleNamespace(**{**vars(tiny_lm), "model": _EchoModel(len(tiny_lm.tokenizer))}))
    # One byte token per letter and the same shape, so only the letters differ: x and q appear in
    # the interest "xqx" and in no template (no word of the tokenizer starts with x or z).
    catalog = [Item("1", "zjzjzjzj"), Item("2", "zvzvzvzv"), Item("3", "xqxqxqxq"), Item("4", "zwzwzwzw")]
    lengths = {len(tiny_lm.tokenizer.encode(" " + i.title)) for i in catalog}
    assert lengths == {9}
    ranked = rank(engine, catalog, Profile(interests=["xqx", "yoga"]), Prompts.load(), kind)
    assert ranked[0].item.id == "3"
    if kind is ScoreKind.pmi:
        assert ranked[0].per_context["interest:xqx"] > 0 and ranked[0].per_context["interest:xqx"] > ranked[0].per_context["interest:yoga"]


def test_metrics_against_hand_computed_cases():
    m = metrics(["a", "b", "c", "d"], {"b", "d"}, k=2)
    assert m["HR@2"] == 1.0
    assert m["nDCG@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["MRR"] == 0.5
    assert m["AUC"] == pytest.approx(1 / 4)  # (b,c) right; (b,a), (d,a), (d,c) wrong
    perfect = metrics(["b", "d", "a", "c"], {"b", "d"}, k=2)
    assert perfect == {"HR@2": 1.0, "nDCG@2": 1.0, "MRR": 1.0, "AUC": 1.0}
    miss = metrics(["a", "c", "b"], {"b"}, k=2)
    assert miss["HR@2"] == 0.0 and miss["nDCG@2"] == 0.0 and miss["MRR"] == pytest.approx(1 / 3) and miss["AUC"] == 0.0


def test_catalog_loaders(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": "x1", "title": "Café opens", "category": "food"}\n\n{"id": "x2", "title": "B"}\n')
    (tmp_path / "c.csv").write_text('id,title,description\n1,"Hello, world",x\n2,"Naïve ""quoted"" title",\n', encoding="utf-8")
    (tmp_path / "c.tsv").write_text("id\ttitle\tcategory\n7\tTabbed title, with comma\tnews\n")
    (tmp_path / "news.tsv").write_text(
        "N1\tsports\tfootball\tBig match tonight\tAbstract here\thttp://x\t[]\t[]\n"
        "N2\tfinance\tmarkets\tMarkets \"rally\"\t\thttp://y\t[]\t[]\n"
    )
    assert [(i.id, i.title, i.category) for i in load_catalog(str(tmp_path / "c.jsonl"))] == [
        ("x1", "Café opens", "food"),
        ("x2", "B", ""),
    ]
    assert [(i.id, i.title) for i in load_catalog(str(tmp_path / "c.csv"))] == [
        ("1", "Hello, world"),
        ("2", 'Naïve "quoted" title'),
    ]
    assert [(i.id, i.title, i.category) for i in load_catalog(str(tmp_path / "c.tsv"))] == [("7", "Tabbed title, with comma", "news")]
    mind = load_catalog(str(tmp_path / "news.tsv"))
    assert [(i.id, i.title, i.category, i.description) for i in mind] == [
        ("N1", "Big match tonight", "sports", "Abstract here"),
        ("N2", 'Markets "rally"', "finance", ""),
    ]
    assert len(load_catalog("sample")) >= 30


def test_catalog_errors(tmp_path):
    (tmp_path / "nt.csv").write_text("id,name\n1,x\n")
    with pytest.raises(UsageError, match="no 'title' column"):
        load_catalog(str(tmp_path / "nt.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        load_catalog(str(tmp_path / "empty.jsonl"))


def test_eval_loaders(tmp_path):
    (tmp_path / "behaviors.tsv").write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0 N5-0\n")
    (user,) = load_eval(str(tmp_path / "behaviors.tsv"))
    assert user.profile.liked == ["N1", "N2"] and user.candidates == ["N3", "N4", "N5"] and user.positives == {"N3"}
    assert len(load_eval("sample")) >= 5


# --- CLI -----------------------------------------------------------------------------------


def test_recommend_cli_top_k_sorted_and_whole_catalog_when_k_is_large(cli):
    rows = cli.jsonl("recommend", "sports", "technology", "--catalog", "sample", "-k", "4", *TINY)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert set(rows[0]["per_interest"]) == {"interest:sports", "interest:technology"}
    rows = cli.jsonl("recommend", "sports", "--catalog", "sample", "-k", "1000", *TINY)
    assert len(rows) == len(load_catalog("sample"))


def test_recommend_cli_explain_and_profile(cli, tmp_path):
    profile = tmp_path / "me.json"
    profile.write_text(json.dumps({"interests": ["music"], "liked": ["I001"], "disliked": ["I002"]}))
    r = cli("recommend", "--profile", str(profile), "--catalog", "sample", "--explain", "--format", "plain", *TINY)
    assert r.exit_code == 0, r.stderr
    header = r.stdout.splitlines()[1].split("\t")
    assert header == ["rank", "id", "title", "score", "per_interest"]
    assert "interest:music=" in r.stdout and "liked=" in r.stdout and "disliked=" in r.stdout
    assert "\tI001\t" not in r.stdout and "\tI002\t" not in r.stdout  # rated items are not recommended again


def test_recommend_eval_prints_a_random_baseline(cli):
    rows = cli.jsonl("recommend", "--catalog", "sample", "--eval", "sample", "-k", "3", *TINY)
    assert [r["ranking"] for r in rows] == ["aigc (pmi)", "random"]
    for r in rows:
        assert set(r) == {"ranking", "HR@3", "nDCG@3", "MRR", "AUC", "users"} and r["users"] == 8
        assert all(0 <= v <= 1 for k, v in r.items() if k not in ("ranking", "users"))
    assert rows[1]["AUC"] == pytest.approx(0.5, abs=0.05)


def test_recommend_ideas_without_catalog(cli):
    rows = cli.jsonl("recommend", "cooking", "travel", "--per-interest", "2", "--seed", "1", *TINY)
    assert rows and all(r["generated"] is True and r["idea"].strip() and "\n" not in r["idea"] for r in rows)
    for interest in ("cooking", "travel"):
        ideas = [r["idea"].lower() for r in rows if r["interest"] == interest]
        assert 1 <= len(ideas) <= 2 and len(ideas) == len(set(ideas))
    r = cli("recommend", "cooking", "--per-interest", "1", *TINY, "--format", "plain")
    assert "Generated ideas (not real items)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["recommend", "--catalog", "sample"], "no user"),
        (["recommend", "x", "--eval", "sample"], "--eval: needs --catalog"),
        (["recommend", "x", "--catalog", "/no/file.csv"], "--catalog /no/file.csv"),
        (["recommend", "x", "-k", "0", "--catalog", "sample"], "-k"),
        (["score", "/no/such.txt"], "/no/such.txt"),
        (["score", "-", "--stride", "0"], "--stride"),
        (["score", "-", "--stride", "5000"], "--stride"),
    ],
)
def test_recommend_and_score_usage_errors(cli, args, message):
    r = cli(*args, *TINY, input="hello")
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_score_cli(cli, tiny_lm, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The cat sat on the mat.\n\nHello world.\n")
    (whole,) = cli.jsonl("score", str(f), *TINY)
    ids = tiny_lm.tokenizer.encode(f.read_text())
    assert whole["tokens"] == len(ids)
    assert whole["nll"] == pytest.approx(-sum(_direct(tiny_lm.model, [256], ids)) / len(ids), abs=1e-5)
    lines = cli.jsonl("score", str(f), "--per-line", *TINY)
    assert [r["line"] for r in lines] == [1, 3]
    assert lines[1]["tokens"] == len(tiny_lm.tokenizer.encode("Hello world."))
    assert all(r["perplexity"] == pytest.approx(math.exp(r["nll"])) for r in lines)
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert cli("score", str(empty), *TINY).exit_code == 2
