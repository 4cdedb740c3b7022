"""Poems: every output of every form passes the independent checker; the control without the
constraint does not; penalties and beam search never break it; checker unit tests."""

from __future__ import annotations

import json

import pytest
import torch

from aigc_cli.engine.decoding import generate_rows
from aigc_cli.engine.engine import Engine
from aigc_cli.core.errors import UsageError
from aigc_cli.apps.poem import FormConstraint, token_budget, write_poems
from aigc_cli.apps.poetics import FORMS, check, hanzi_rhyme, resolve_form, rhyme_key, syllables
from aigc_cli.apps.prompts import load_prompt
from aigc_cli.core.settings import Decoding, GenerationSettings as S

EN_FORMS = ["free", "haiku", "tanka", "limerick", "couplet", "quatrain", "sonnet"]
ZH_FORMS = ["wujue", "qijue", "wulv", "qilv", "gujue"]


@pytest.fixture(scope="module")
def en():
    return Engine.load("tiny-random")


@pytest.fixture(scope="module")
def zh():
    return Engine.load("tiny-random-zh")


def _poems(engine, form, seed, n=2, candidates=3, acrostic=None, **kw):
    settings = S(num_sequences=n, seed=seed, **kw).resolved()
    language = form.language
    return write_poems(engine, "the sea", form, settings, candidates, load_prompt(f"poem-{language}.txt", "-"), acrostic)


@pytest.mark.parametrize("name", EN_FORMS)
def test_every_english_form_fits_over_many_seeds(en, name):
    form = FORMS[name]
    for seed in range(4):
        poems = _poems(en, form, seed)
        assert len(poems) == 2
        for p in poems:
            report = check(p.text, form)
            assert report.ok, (report.problems, p.text)
            assert len(p.lines) == form.lines


@pytest.mark.parametrize("name", ZH_FORMS)
def test_every_chinese_form_fits_over_many_seeds(zh, name):
    form = FORMS[name]
    for seed in range(4):
        for p in _poems(zh, form, seed):
            report = check(p.text, form)
            assert report.ok, (report.problems, p.text)
            lines = p.text.splitlines()
            assert [line[-1] for line in lines] == ["，", "。"] * (form.lines // 2)
            rhymes = [line[-2] for line in lines[1::2]]
            assert len(set(rhymes)) == len(rhymes)  # no repeated rhyme character
            assert len({hanzi_rhyme(ch)[0] for ch in rhymes}) == 1


def test_acrostic(zh):
    form = FORMS["qijue"]
    for seed in range(3):
        for p in _poems(zh, form, seed, acrostic="春夏秋冬"):
            assert check(p.text, form, "春夏秋冬").ok
            assert [line[0] for line in p.text.splitlines()] == list("春夏秋冬")


def test_overrides_fit(en):
    form = resolve_form("free", syllables="3,4-5,6", rhyme_scheme="A.A")
    for seed in range(3):
        for p in _poems(en, form, seed):
            assert check(p.text, form).ok, p.text
            assert [c for c in p.counts] in ([3, 4, 6], [3, 5, 6])


@pytest.mark.parametrize("name", ["haiku", "limerick", "wujue"])
def test_control_without_the_constraint_fails_the_form(en, zh, name):
    """The same model and prompt, unconstrained: the form is not met, so the tests above have teeth."""
    form = FORMS[name]
    engine = zh if form.language == "zh" else en
    prompt = engine.encode(load_prompt(f"poem-{form.language}.txt", "-").replace("$topic", "the sea"), S().resolved())
    settings = S(num_sequences=1, max_new_tokens=token_budget(form), seed=0).resolved()
    results = generate_rows(engine.lm, [prompt] * 8, settings, list(range(8)))
    from aigc_cli.apps.poem import poem_text

    texts = [poem_text(engine.tokenizer, form, r.token_ids) for r in results]
    assert not any(check(t, form).ok for t in texts)


@pytest.mark.parametrize("name", ["sonnet", "limerick", "haiku", "qilv"])
def test_penalties_and_beam_never_break_the_form(en, zh, name):
    form = FORMS[name]
    engine = zh if form.language == "zh" else en
    for kw in (
        {"repetition_penalty": 1.8, "no_repeat_ngram_size": 1},
        {"no_repeat_ngram_size": 2, "top_k": 3, "top_p": 0.5, "temperature": 0.7},
        {"decoding": Decoding.beam, "num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    ):
        poems = _poems(engine, form, 5, **kw)
        assert poems
        for p in poems:
            assert check(p.text, form).ok, (kw, p.text)


def test_guard_restores_rows_emptied_by_other_processors(en):
    form = FORMS["haiku"]
    tok = en.tokenizer
    constraint = FormConstraint(tok, form, prompt_width=2)
    ids = torch.tensor([[5, 6], [5, 6]])
    scores = torch.zeros(2, len(tok))
    scores[1] = -float("inf")  # e.g. a no-repeat-ngram processor banned everything
    out = constraint(ids, scores)
    allowed0, allowed1 = torch.isfinite(out[0]), torch.isfinite(out[1])
    assert allowed0.any() and torch.equal(allowed0, allowed1)
    first_words = [tok.decode([int(i)]) for i in allowed0.nonzero()[:20]]
    assert all(w.isalpha() and " " not in w for w in first_words)  # a line starts with a whole word


def test_rerank_keeps_the_best_candidates_by_score(en):
    all_poems = _poems(en, FORMS["haiku"], 11, n=4, candidates=4)
    best = _poems(en, FORMS["haiku"], 11, n=2, candidates=4)
    assert [p.text for p in best] == [p.text for p in all_poems[:2]]
    assert [p.score for p in all_poems] == sorted((p.score for p in all_poems), reverse=True)


# --- checker unit tests ---------------------------------------------------------------------


def test_syllables_and_rhyme_keys_of_known_words():
    assert [syllables(w) for w in ["cat", "river", "beautiful", "memory", "fire"]] == [1, 2, 3, 3, 2]
    assert rhyme_key("night") == rhyme_key("light") == "AY T"
    assert rhyme_key("day") == "EY" and rhyme_key("heart") == "AA R T"
    assert syllables("xqzzy") is None


def test_rhyme_groups_of_known_hanzi():
    assert hanzi_rhyme("光")[0] == hanzi_rhyme("霜")[0] == hanzi_rhyme("乡")[0] == "唐"
    assert hanzi_rhyme("花")[0] == "麻" and hanzi_rhyme("诗")[0] == "支" and hanzi_rhyme("西")[0] == "齐"
    assert hanzi_rhyme("春")[0] == "文" and hanzi_rhyme("风")[0] == "庚"
    assert hanzi_rhyme("光")[1] == 1 and hanzi_rhyme("月")[1] == 4


def test_checker_on_known_poems():
    assert check("An old silent pond,\nA frog jumps into the pond\nsplash silence again.", FORMS["haiku"]).ok
    bad = check("An old silent pond\nA frog jumps in the pond\nsplash silence again", FORMS["haiku"])
    assert bad.problems == ["line 2: 6 syllables, expected 7"]
    assert check("床前明月光，\n疑是地上霜。\n举头望明月，\n低头思故乡。", FORMS["gujue"]).ok
    wrong = check("床前明月光，\n疑是地上霜。\n举头望明月，\n低头思故人。", FORMS["wujue"])
    assert any(p.startswith("line 4: does not rhyme") for p in wrong.problems)
    couplet = check("The sun is high above the quiet sea,\nThe wind is cold and I am far from thee.", FORMS["couplet"])
    assert couplet.ok, couplet.problems
    same = check("The sun is high above the quiet sea,\nThe wind is cold and I am by the sea.", FORMS["couplet"])
    assert same.ok, same.problems  # an English rhyme word may repeat (Lear's limericks do)
    repeated = check("床前明月光，\n疑是地上霜。\n举头望明月，\n低头思故霜。", FORMS["wujue"])
    assert any("repeats the rhyme" in p for p in repeated.problems)  # regulated verse never does


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "ode"}, "--form"),
        ({"name": "haiku", "syllables": "5,7"}, "--syllables"),
        ({"name": "haiku", "syllables": "x"}, "--syllables"),
        ({"name": "sonnet", "lines": 3}, "--lines"),
        ({"name": "quatrain", "rhyme_scheme": "AB"}, "--rhyme-scheme"),
        ({"name": "wujue", "syllables": "5"}, "--syllables"),
    ],
)
def test_bad_form_overrides(kwargs, message):
    with pytest.raises(UsageError, match=message):
        resolve_form(**kwargs)


# --- CLI ------------------------------------------------------------------------------------


def test_poem_cli_jsonl_and_check_roundtrip(cli, tmp_path):
    r = cli("poem", "the moon", "--form", "limerick", "-n", "2", "--seed", "3", "--model", "tiny-random", "--format", "jsonl")
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["score"] >= recs[1]["score"]
    for rec in recs:
        assert set(rec) >= {"lines", "counts", "rhymes", "score", "seed", "text", "model", "form"}
        assert rec["rhymes"][0] == rec["rhymes"][1] == rec["rhymes"][4]
        f = tmp_path / "p.txt"
        f.write_text(rec["text"])
        assert cli("poem", "--check", str(f), "--form", "limerick").exit_code == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("An old silent pond\nA frog jumps in the pond\nsplash silence again\n")
    r = cli("poem", "--check", str(bad), "--form", "haiku")
    assert r.exit_code == 1 and "line 2: 6 syllables, expected 7" in r.stderr
    r = cli("poem", "--check", "-", "--form", "haiku", input="An old silent pond\nA frog jumps into the pond\nsplash silence again\n")
    assert r.exit_code == 0


def test_poem_cli_rich_panels_and_annotations(cli):
    r = cli("poem", "rain", "--form", "haiku", "--annotate", "--format", "rich", "--model", "tiny-random", "--seed", "1")
    assert r.exit_code == 0, r.stderr
    assert "Poem 1" in r.stdout and "[5" in r.stdout and "[7" in r.stdout and "╭" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["poem", "在寂静的夜晚", "--model", "tiny-random"], "uer/gpt2-chinese-poem"),
        (["poem", "night", "--form", "wujue", "--model", "tiny-random"], "uer/gpt2-chinese-poem"),
        (["poem", "night", "--form", "haiku", "--model", "tiny-random-zh"], "English GPT-2"),
        (["poem", "春", "--form", "wujue", "--acrostic", "春夏", "--model", "tiny-random-zh"], "--acrostic"),
        (["poem", "春", "--form", "wujue", "--acrostic", "春夏秋龘", "--model", "tiny-random-zh"], "--acrostic"),
        (["poem", "--model", "tiny-random"], "no topic"),
        (["poem", "x", "--decoding", "greedy", "--model", "tiny-random"], "--decoding"),
        (["poem", "x", "-n", "5", "--candidates", "2", "--model", "tiny-random"], "--candidates"),
    ],
)
def test_poem_usage_errors(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
