"""Regulated verse (近体诗): the 平仄 checker on real Tang poems, and generated poems that keep the
tonal pattern by construction, judged by an independent checker written here from pypinyin and the
four patterns as textbooks print them."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_cli.apps.poem import write_poems
from aigc_cli.apps.poetics import FORMS, check, resolve_form, verse_lines
from aigc_cli.apps.prompts import load_prompt
from aigc_cli.core.errors import UsageError
from aigc_cli.core.settings import GenerationSettings as S
from aigc_cli.engine.engine import Engine

POEMS = Path(__file__).parent / "poems"


def _blocks(name: str) -> list[tuple[list[str], str]]:
    """(header fields, poem text) of each block of a tests/poems file."""
    out = []
    for block in (POEMS / name).read_text("utf-8").split("\n## ")[1:]:
        head, *lines = block.strip().splitlines()
        out.append(([x.strip() for x in head.split("|")], "\n".join(lines)))
    return out


REGULATED = _blocks("tang-regulated.txt")
IRREGULAR = _blocks("tang-irregular.txt")


def test_enough_real_poems():
    assert len(REGULATED) >= 20
    assert {fields[2] for fields, _ in REGULATED} == {"wujue", "qijue", "wulv", "qilv"}


@pytest.mark.parametrize("fields, text", REGULATED, ids=[f[0] for f, _ in REGULATED])
def test_tang_regulated_poems_are_accepted_with_their_rhyme_book(fields, text):
    title, _, form, books = fields
    for rhymes in ("xinyun", "pingshui") if books == "both" else (books,):
        report = check(text, resolve_form(form), rhymes=rhymes)
        assert report.ok, (title, rhymes, report.problems)
        assert report.pattern


def test_modern_book_rejects_entering_tone_characters():
    """登鹳雀楼 fits either book; 八阵图 only the classical one: 国 (入声) ends its first line, 仄 in
    平水韵 but guó (平) in modern Mandarin."""
    text = dict((f[0], t) for f, t in REGULATED)
    assert check(text["登鹳雀楼"], FORMS["wujue"], rhymes="xinyun").ok
    report = check(text["八阵图"], FORMS["wujue"], rhymes="xinyun")
    assert "line 1, position 5: 国 (guó) is 平, expected 仄 (出句仄收)" in report.problems


@pytest.mark.parametrize("fields, text", IRREGULAR, ids=[f[0] for f in (f for f, _ in IRREGULAR)])
def test_rule_breaking_poems_are_reported_by_line_position_and_rule(fields, text):
    title, _, form, rhymes, line, position, rule = fields
    report = check(text, resolve_form(form), rhymes=rhymes)
    assert not report.ok
    first = report.problems[0]
    assert first.startswith(f"line {line}, position {position}: ") and first.endswith(f"({rule})"), (title, report.problems)


def test_chunxiao_is_a_gujue_not_a_wujue():
    text = dict((f[0], t) for f, t in IRREGULAR)["春晓"]
    assert check(text, FORMS["gujue"], rhymes="pingshui").ok
    problems = check(text, FORMS["wujue"], rhymes="pingshui").problems
    assert problems[0] == "line 2, position 5: 鸟 (上聲十七篠仄) is 仄, expected 平 (韵脚)"


def test_strict_fixes_the_free_positions():
    # 绝句 (杜甫): 一行白鹭上青天 has 一 (入声, 仄) at position 1, free under relaxed rules, where the
    # strict pattern 平平仄仄仄平平 wants 平.
    text = dict((f[0], t) for f, t in REGULATED)["绝句"]
    assert check(text, FORMS["qijue"], rhymes="pingshui", tones="relaxed").ok
    strict = check(text, FORMS["qijue"], rhymes="pingshui", tones="strict")
    assert "line 2, position 1: 一 (入聲四質仄) is 仄, expected 平 (定格)" in strict.problems


def test_pattern_flag_fixes_the_pattern():
    text = dict((f[0], t) for f, t in REGULATED)["登鹳雀楼"]  # 仄起首句不入韵
    assert check(text, FORMS["wujue"], pattern="zeqi").ok
    assert check(text, FORMS["wujue"], pattern="仄起").pattern == "仄起首句不入韵"
    wrong = check(text, FORMS["wujue"], pattern="pingqi")
    assert not wrong.ok and "(--pattern)" in wrong.problems[0]
    rhymed = check(text, FORMS["wujue"], pattern="zeqi-rhymed")  # 尽 does not rhyme with 流, 楼
    assert rhymed.problems[0].startswith("line 1, position 5: 尽") and rhymed.problems[0].endswith("(首句入韵)")


def test_annotation_marks_each_character():
    text = dict((f[0], t) for f, t in REGULATED)["登鹳雀楼"]
    marks = [line.marks for line in check(text, FORMS["wujue"], rhymes="pingshui").lines]
    assert marks == ["仄仄平平仄", "平平仄仄平", "仄平平仄仄", "〇仄仄平平"]  # 日, 入 are 仄 (入声); 更 has both readings


# --- an independent checker for generated poems ------------------------------------------------

# The four 五言绝句 patterns as printed in 王力《诗词格律》; a 律诗 is the pattern followed by its
# 首句不入韵 form; a 七言 line puts two characters of the opposite tone before the 五言 line.
QUATRAINS = {
    "仄起首句不入韵": ["仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平"],
    "仄起首句入韵": ["仄仄仄平平", "平平仄仄平", "平平平仄仄", "仄仄仄平平"],
    "平起首句不入韵": ["平平平仄仄", "仄仄仄平平", "仄仄平平仄", "平平仄仄平"],
    "平起首句入韵": ["平平仄仄平", "仄仄仄平平", "仄仄平平仄", "平平仄仄平"],
}


def _textbook(name: str, chars: int, lines: int) -> list[str]:
    five = QUATRAINS[name] + (QUATRAINS[name.replace("首句入韵", "首句不入韵")] if lines == 8 else [])
    if chars == 5:
        return five
    flip = {"平": "仄", "仄": "平"}
    return [flip[line[0]] * 2 + line for line in five]  # 仄仄平平仄 -> 平平仄仄平平仄


def _pypinyin_tones(ch: str) -> set[str]:
    from pypinyin import Style, pinyin

    readings = pinyin(ch, style=Style.TONE3, heteronym=True, strict=True, neutral_tone_with_five=True)[0]
    return {"平" if r[-1] in "12" else "仄" for r in readings if r[-1] in "1234"}


def _fits(line: str, pattern: str, strict: bool) -> bool:
    tones = [_pypinyin_tones(ch) for ch in line]
    n = len(line)
    fixed = range(n) if strict else [p for p in range(n) if p % 2 == 1 or p == n - 1]
    if any(pattern[p] not in tones[p] for p in fixed):
        return False
    core = n - 5
    if "仄" not in tones[core + 2] and all("仄" not in t for t in tones[core + 3 :]):
        return False  # 三平尾: the last three characters all 平
    if pattern[core:] == "平平仄仄平" and "平" not in tones[core] and "平" not in tones[core + 2]:
        return False  # 孤平: the second character is the line's only 平 before the rhyme
    return True


def independent_check(text: str, form_name: str, strict: bool) -> bool:
    """Does a poem follow one of the four textbook patterns, readings from pypinyin (中华新韵)?"""
    form = FORMS[form_name]
    lines = [line.rstrip("，。") for line in verse_lines(text)]
    chars = form.lengths[0][0]
    return any(
        all(_fits(line, pat, strict) for line, pat in zip(lines, _textbook(name, chars, form.lines)))
        for name in QUATRAINS
    )


def test_the_independent_checker_agrees_on_real_poems():
    text = dict((f[0], t) for f, t in REGULATED)
    assert independent_check(text["登鹳雀楼"], "wujue", strict=False)
    assert independent_check(text["早发白帝城"], "qijue", strict=False)
    assert not independent_check(dict((f[0], t) for f, t in IRREGULAR)["静夜思"], "wujue", strict=False)


@pytest.fixture(scope="module")
def zh():
    return Engine.load("tiny-random-zh")


def _poems(engine, form, seed, n=4, **kw):
    settings = S(num_sequences=n, seed=seed).resolved()
    return write_poems(engine, "春", form, settings, n, load_prompt("poem-zh.txt", "-"), **kw)


@pytest.mark.parametrize("name", ["wujue", "qijue", "wulv", "qilv"])
@pytest.mark.parametrize("tones", ["strict", "relaxed"])
def test_generated_regulated_verse_keeps_the_tonal_pattern(zh, name, tones):
    form = FORMS[name]
    patterns = set()
    for seed in range(3):
        for p in _poems(zh, form, seed, tones=tones):
            assert independent_check(p.text, name, strict=tones == "strict"), p.text
            assert check(p.text, form, tones=tones).ok, p.text
            patterns.add(p.pattern)
    assert len(patterns) > 1  # the four patterns stay open until the first line commits


@pytest.mark.parametrize("name", ["wujue", "qilv"])
def test_generated_verse_under_the_classical_book(zh, name):
    form = FORMS[name]
    for seed in range(2):
        for p in _poems(zh, form, seed, rhymes="pingshui"):
            report = check(p.text, form, rhymes="pingshui")
            assert report.ok, (report.problems, p.text)


def test_control_without_tones_breaks_the_pattern(zh):
    """--tones off: the same model writes lines, characters and rhymes only, and most poems break
    the pattern, so the tests above have teeth."""
    texts = [p.text for seed in range(3) for p in _poems(zh, FORMS["wujue"], seed, tones="off")]
    assert sum(independent_check(t, "wujue", strict=False) for t in texts) <= len(texts) // 2


def test_pattern_flag_in_generation(zh):
    for seed in range(2):
        for p in _poems(zh, FORMS["qijue"], seed, pattern="pingqi-rhymed", tones="strict"):
            assert p.pattern == "平起首句入韵"
            assert check(p.text, FORMS["qijue"], tones="strict", pattern="pingqi-rhymed").ok


def test_acrostic_that_no_strict_pattern_fits_names_line_and_position(zh):
    # 花 and 秋 are both 平 only: under strict rules lines 1 and 2 of every pattern start on opposite tones
    with pytest.raises(UsageError, match="'秋' \\(qiū\\) cannot start line 2: position 1 needs 仄"):
        _poems(zh, FORMS["wujue"], 0, acrostic="花秋冬春", tones="strict")
    for p in _poems(zh, FORMS["wujue"], 0, acrostic="花秋冬春"):  # relaxed: position 1 is free
        assert check(p.text, FORMS["wujue"], acrostic="花秋冬春").ok


def test_gujue_generation(zh):
    for p in _poems(zh, FORMS["gujue"], 1):
        assert check(p.text, FORMS["gujue"]).ok


# --- CLI ----------------------------------------------------------------------------------------


def test_check_command_reports_violations(cli, tmp_path):
    f = tmp_path / "chunxiao.txt"
    f.write_text(dict((f[0], t) for f, t in IRREGULAR)["春晓"], encoding="utf-8")
    r = cli("poem", "--check", str(f), "--form", "wujue", "--rhymes", "pingshui")
    assert r.exit_code == 1 and "line 2, position 5: 鸟" in r.stderr and "(韵脚)" in r.stderr
    assert cli("poem", "--check", str(f), "--form", "gujue", "--rhymes", "pingshui").exit_code == 0
    assert cli("poem", "--check", str(f), "--form", "wujue", "--tones", "off").exit_code == 0
    r = cli("poem", "--check", str(f), "--form", "gujue", "--rhymes", "pingshui", "--annotate", "--format", "jsonl")
    assert r.exit_code == 0 and '"marks": "平平〇仄仄"' in r.stdout  # 不 has a 平 and a 仄 reading


def test_generate_command_annotates_tones(cli):
    r = cli("poem", "春", "--form", "wujue", "--model", "tiny-random-zh", "--annotate", "--format", "plain", "--seed", "2")
    assert r.exit_code == 0, r.stderr
    assert "首句" in r.stdout and ("平" in r.stdout and "仄" in r.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["poem", "x", "--form", "haiku", "--tones", "strict", "--model", "tiny-random"], "--tones"),
        (["poem", "春", "--form", "gujue", "--pattern", "zeqi", "--model", "tiny-random-zh"], "--pattern"),
        (["poem", "春", "--form", "wujue", "--pattern", "sideways", "--model", "tiny-random-zh"], "--pattern"),
        (["poem", "春", "--form", "wujue", "--pattern", "zeqi", "--tones", "off", "--model", "tiny-random-zh"], "--pattern"),
        (["poem", "x", "--form", "limerick", "--meter", "iambic", "--model", "tiny-random"], "--meter"),
        (["poem", "春", "--form", "wujue", "--tones", "strict", "--acrostic", "花秋冬春", "--model", "tiny-random-zh"], "line 2"),
    ],
)
def test_verse_usage_errors(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, tones", [("qilv", "relaxed"), ("wujue", "strict")])
def test_two_hundred_poems_keep_the_pattern(zh, name, tones):
    """The guarantee at scale (bench/poem.py --part guarantee runs every form and flag value)."""
    form, seen = FORMS[name], 0
    for seed in range(25):
        for p in _poems(zh, form, 1000 + seed, n=8, tones=tones):
            assert independent_check(p.text, name, strict=tones == "strict"), p.text
            seen += 1
    assert seen == 200


def test_a_vocabulary_that_cannot_fill_a_position_names_it(zh):
    """With no 仄 character left in the vocabulary, --tones strict --pattern zeqi cannot start a line."""
    import dataclasses

    import torch

    from aigc_cli.apps.poem import FormConstraint

    constraint = FormConstraint(zh.tokenizer, FORMS["wujue"], 0, tones="strict", pattern="zeqi")
    constraint.zh = dataclasses.replace(constraint.zh, ze=torch.zeros_like(constraint.zh.ze))
    with pytest.raises(UsageError, match=r"can fill line 1, position 1 \(it needs 仄"):
        constraint._allowed_zh([])
