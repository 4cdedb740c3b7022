"""`aigc stats`: distinct-n against a naive count, self-BLEU against nltk called directly (Texygen's
loop), repetition and lengths by hand, groups by prompt, Chinese characters, bad records, --model."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics

import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

WORDS = "the cat dog sat ran on under a mat log and then".split()


def _texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0 if i == 3 else 1, 14))) for i in range(count)]


def _naive_distinct(texts: list[list[str]], n: int) -> float:
    grams = []
    for t in texts:
        for i in range(len(t) - n + 1):
            grams.append(" ".join(t[i : i + n]))  # a different key than the code's tuples
    return len(set(grams)) / len(grams)


def _texygen(texts: list[list[str]], n: int) -> float:
    """Texygen's SelfBleu.get_bleu_parallel, one order at a time."""
    weight = tuple(1.0 / n for _ in range(n))
    scores = []
    for i, hypothesis in enumerate(texts):
        other = texts[:i] + texts[i + 1 :]
        scores.append(sentence_bleu(other, hypothesis, weight, smoothing_function=SmoothingFunction().method1))
    return sum(scores) / len(scores)


@pytest.fixture
def generated(tmp_path):
    """A generate-style JSONL: two prompts, 9 and 6 texts (one of them empty)."""
    a, b = _texts(1, 9), _texts(2, 6)
    path = tmp_path / "gen.jsonl"
    records = [{"id": 0, "index": i, "prompt": "Once upon a time", "text": t} for i, t in enumerate(a)]
    records += [{"id": 1, "index": i, "prompt": "The weather", "text": t} for i, t in enumerate(b)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, {"overall": a + b, "Once upon a time": a, "The weather": b}


def test_measures_against_independent_computations(cli, generated):
    path, groups = generated
    rows = cli.jsonl("stats", str(path))
    assert [r["prompt"] for r in rows] == [None, "Once upon a time", "The weather"]
    for row in rows:
        texts = [t.split() for t in groups[row["prompt"] or "overall"]]
        assert row["texts"] == len(texts) and row["unit"] == "word"
        for n in (1, 2, 3):
            assert row[f"distinct_{n}"] == pytest.approx(_naive_distinct(texts, n), abs=1e-12)
        for n in (2, 3, 4):
            assert row[f"self_bleu_{n}"] == pytest.approx(_texygen(texts, n), abs=1e-12)
        assert row["self_bleu"] == row["self_bleu_4"]
        assert row["bleu_texts"] == len(texts) and row["bleu_sampled"] is False
        for n in (2, 3, 4):
            reps = [1 - len({tuple(t[i : i + n]) for i in range(len(t) - n + 1)}) / (len(t) - n + 1) for t in texts if len(t) >= n]
            assert row[f"rep_{n}"] == pytest.approx(statistics.mean(reps), abs=1e-12)
        lengths = [len(t) for t in texts]
        assert row["length_mean"] == pytest.approx(statistics.mean(lengths))
        assert (row["length_min"], row["length_max"]) == (min(lengths), max(lengths))
        assert row["length_median"] == sorted(lengths)[math.ceil(len(lengths) / 2) - 1]  # nearest rank
        assert "mean_logprob" not in row


def test_self_bleu_over_a_seeded_sample(cli, generated):
    path, groups = generated
    rows = cli.jsonl("stats", str(path), "--bleu-sample", "4")
    again = cli.jsonl("stats", str(path), "--bleu-sample", "4")
    assert rows == again  # seeded
    overall = rows[0]
    assert overall["bleu_texts"] == 4 and overall["bleu_sampled"] is True
    texts = [t.split() for t in groups["The weather"]]  # 6 texts: every 4-subset's self-BLEU, by nltk
    possible = [_texygen([texts[i] for i in subset], 4) for subset in itertools.combinations(range(6), 4)]
    got = rows[2]["self_bleu_4"]
    assert any(abs(got - p) < 1e-12 for p in possible)
    r = cli("stats", str(path), "--bleu-sample", "4", "--format", "plain")
    assert "seeded sample of 4 texts" in r.stdout  # the output says so


def test_chinese_text_counts_characters_and_plain_lines(cli, tmp_path):
    lines = ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。", "春眠不觉晓，花落知多少。"]
    f = tmp_path / "zh.txt"
    f.write_text("\n".join(lines) + "\n\n")
    (row,) = cli.jsonl("stats", str(f))
    chars = [list(t) for t in lines]
    assert row["unit"] == "char" and row["texts"] == 3 and row["prompt"] is None
    for n in (1, 2, 3):
        assert row[f"distinct_{n}"] == pytest.approx(_naive_distinct(chars, n))
    assert row["self_bleu_2"] == pytest.approx(_texygen(chars, 2))
    (words,) = cli.jsonl("stats", str(f), "--unit", "word")  # each line is one "word"
    assert words["unit"] == "word" and words["distinct_1"] == 1.0 and words["distinct_2"] is None  # no 2-grams


def test_bad_records_are_reported_and_the_rest_measured(cli, generated):
    path, groups = generated
    good = path.read_text().splitlines()
    path.write_bytes(("\n".join(good[:2]) + "\n{broken\n[1, 2]\n" + '{"prompt": "x"}\n').encode() + b"\xff\n" + ("\n".join(good[2:]) + "\n").encode())
    r = cli("stats", str(path), "--format", "jsonl")
    assert r.exit_code == 4, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    errors = [o for o in out if "error" in o]
    assert [e["line"] for e in errors] == [3, 4, 5, 6]
    assert out[len(errors)]["texts"] == len(groups["overall"])
    assert "line 3" in r.stderr and "Traceback" not in r.stderr


def test_with_a_model_mean_logprob_equals_transformers(cli, tmp_path, tiny_lm):
    path = tmp_path / "g.jsonl"
    records = [{"prompt": "Hello", "text": " world and more"}, {"prompt": "Hello", "text": " there"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = cli.jsonl("stats", str(path), "--model", "tiny-random")
    tok = tiny_lm.tokenizer
    total, count = 0.0, 0
    for r in records:
        ctx, ids = tok.encode(r["prompt"]), tok.encode(r["text"])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_lm.hf_model(torch.tensor([ctx + ids])).logits[0].float(), -1)
        total += sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(ids))
        count += len(ids)
    assert rows[0]["scored_tokens"] == count
    assert rows[0]["mean_logprob"] == pytest.approx(total / count, abs=1e-5)
    assert rows[0]["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_token_units_with_the_chinese_model(cli, tmp_path):
    f = tmp_path / "zh.txt"
    f.write_text("春不闻啼鸟\n春不闻啼鸟\n")  # characters the tiny vocabulary has
    (row,) = cli.jsonl("stats", str(f), "--unit", "token", "--model", "tiny-random-zh")
    assert row["unit"] == "token" and row["texts"] == 2
    assert row["length_mean"] == 5 and row["distinct_1"] == pytest.approx(0.5)  # one token per character
    assert row["self_bleu"] == pytest.approx(1.0)
    assert row["perplexity"] > 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--unit", "token"], "--unit token"),
        (["--bleu-sample", "1"], "--bleu-sample"),
        (["--unit", "syllable"], "--unit"),
    ],
)
def test_usage_errors(cli, args, message):
    r = cli("stats", "-", *args, input="a b c\n")
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_and_empty_inputs(cli, tmp_path):
    r = cli("stats", str(tmp_path / "none.txt"))
    assert r.exit_code == 2 and "none.txt" in r.stderr
    r = cli("stats", "-", input="\n\n")
    assert r.exit_code == 2 and "no text" in r.stderr


def test_the_bleu_sample_is_uniform():
    """Reservoir sampling: each of 10 texts lands in a sample of 3 with probability 3/10."""
    from aigc_cli.apps.textstats import Group

    seen = [0] * 10
    runs = 3000
    for seed in range(runs):
        g = Group("overall", None, 3, seed)
        for i in range(10):
            g.add("word", [str(i)])
        for seq in g.sample:
            seen[int(seq[0])] += 1
    assert all(abs(s / runs - 0.3) < 0.035 for s in seen), seen  # 4 standard deviations


def test_input_is_read_a_line_at_a_time(tmp_path, monkeypatch):
    """What streams a file larger than memory: lines come out while most of the file is unread."""
    import builtins

    from aigc_cli.jobs import textfiles

    f = tmp_path / "big.txt"
    f.write_bytes(b"\xef\xbb\xbf" + b"".join(b"line %d of the file\r\n" % i for i in range(20000)))
    size = f.stat().st_size
    taken = [0]

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __getattr__(self, name):
            attr = getattr(self.fh, name)
            if name in ("read", "readline", "readlines", "read1", "readinto", "__next__"):
                def counted(*a, **k):
                    out = attr(*a, **k)
                    taken[0] += len(out) if isinstance(out, (bytes, str)) else (out if isinstance(out, int) else sum(map(len, out)))
                    return out
                return counted
            return attr

        def __iter__(self):
            return self

        def __next__(self):
            return self.__getattr__("__next__")()

    monkeypatch.setattr(textfiles, "open", lambda *a, **k: Counting(builtins.open(*a, **k)), raising=False)
    seen: list[tuple[int, int | None]] = []
    lines = textfiles.read_lines(str(f), on_bytes=lambda done, total: seen.append((done, total)))
    first = next(lines)
    assert first.text == "line 0 of the file" and taken[0] < size // 100
    rest = list(lines)
    assert len(rest) == 19999 and rest[-1].text == "line 19999 of the file" and seen[-1] == (size, size)


def test_units_by_script():
    from aigc_cli.apps.textstats import unit_of, units

    assert unit_of("春眠不觉晓，处处闻啼鸟。") == "char"
    assert unit_of("これはペンです。") == "char"  # Japanese: hiragana, katakana
    assert unit_of("The cat sat on the mat.") == "word"
    assert unit_of("Python 是一种编程语言") == "char" and unit_of("I like 猫 very much") == "word"
    assert units("猫 が 好き", "auto") == ("char", ["猫", "が", "好", "き"])


def test_aigc_model_in_the_environment_does_not_make_stats_score(cli, tmp_path):
    """AIGC_MODEL is set for generating; stats measures the texts alone unless --model is typed."""
    f = tmp_path / "texts.txt"
    f.write_text("the sea at night\nthe moon over the sea\n")
    r = cli("stats", str(f), "--format", "jsonl", env={"AIGC_MODEL": "tiny-random"})
    assert r.exit_code == 0, r.stderr
    assert all("perplexity" not in json.loads(line) for line in r.stdout.splitlines())
