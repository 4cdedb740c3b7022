"""`aigc poem --check` on real, well-known poems as they are usually printed."""

from __future__ import annotations

import pytest

from aigc_cli.apps.poetics import check, resolve_form, verse_lines

BASHO = """An old silent pond
A frog jumps into the pond
Splash! Silence again."""

LEAR = """There was an Old Man with a beard,
Who said, 'It is just as I feared!—
Two Owls and a Hen,
Four Larks and a Wren,
Have all built their nests in my beard!'"""

POPE = """True wit is nature to advantage dress'd,
What oft was thought, but ne'er so well express'd;"""

FROST = """Whose woods these are I think I know.
His house is in the village though;
He will not see me stopping here
To watch his woods fill up with snow."""

SONNET_130 = """My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
   And yet, by heaven, I think my love as rare
   As any she belied with false compare."""

JING_YE_SI = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"  # 李白 静夜思, a couplet per printed line
CHUN_XIAO = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"  # 孟浩然 春晓: 仄声 rhymes
ZAO_FA = "朝辞白帝彩云间，\n千里江陵一日还。\n两岸猿声啼不住，\n轻舟已过万重山。"  # 李白 早发白帝城
CHUN_WANG = "国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。"  # 杜甫 春望
HUANG_HE_LOU = (  # 崔颢 黄鹤楼
    "昔人已乘黄鹤去，此地空余黄鹤楼。\n黄鹤一去不复返，白云千载空悠悠。\n"
    "晴川历历汉阳树，芳草萋萋鹦鹉洲。\n日暮乡关何处是？烟波江上使人愁。"
)
DENG_GAO = (  # 杜甫 登高: 回/来/台/杯 rhyme in 平水韵 (灰), not in modern pinyin
    "风急天高猿啸哀，渚清沙白鸟飞回。\n无边落木萧萧下，不尽长江滚滚来。\n"
    "万里悲秋常作客，百年多病独登台。\n艰难苦恨繁霜鬓，潦倒新停浊酒杯。"
)


@pytest.mark.parametrize(
    "text, form, scheme",
    [
        (BASHO, "haiku", None),
        (LEAR, "limerick", None),  # repeats its rhyme word, as Lear does
        (POPE, "couplet", None),  # dress'd / express'd: outside the dictionary, counted from spelling
        (FROST, "quatrain", "AABA"),
        (SONNET_130, "sonnet", None),  # every/heaven/wires take their shorter pronunciations
    ],
    ids=["basho", "lear", "pope", "frost", "sonnet-130"],
)
def test_real_english_poems_fit_their_forms(text, form, scheme):
    # Sonnet 130's "perfumes" is per-FUMES in the CMU dictionary, which the meter refuses on
    # syllable 5 (tests/test_meter.py); lines, syllables and rhymes are checked here.
    report = check(text, resolve_form(form, rhyme_scheme=scheme), meter="off" if text is SONNET_130 else None)
    assert report.ok, report.problems


def test_estimated_words_are_reported():
    report = check(POPE, resolve_form("couplet"))
    assert report.lines[0].estimated == () and report.lines[0].count == 10  # dress'd is read as dressed
    report = check("Whitecaps on the bay", resolve_form("free", syllables="5", lines=1))
    assert report.ok and report.lines[0].estimated == ("Whitecaps",)


def test_any_pronunciation_counts():
    # "temperate" has a three- and a four-syllable pronunciation; "every" two and three
    report = check("Thou art more lovely and more temperate", resolve_form("free", syllables="10", lines=1))
    assert report.ok, report.problems


@pytest.mark.parametrize(
    "text, form, problem",
    [
        (BASHO.replace("old silent", "old"), "haiku", "line 1: 3 syllables, expected 5"),
        (FROST, "quatrain", "line 3: does not rhyme with line 1 ('here', IY R vs OW)"),  # ABAB asked, the poem is AABA
        (LEAR.rsplit("\n", 1)[0], "limerick", "4 lines, expected 5"),
    ],
)
def test_poems_that_do_not_fit_are_still_refused(text, form, problem):
    report = check(text, resolve_form(form))
    assert problem in report.problems, report.problems


@pytest.mark.parametrize(
    "text, form, rhymes",
    [
        (JING_YE_SI, "gujue", "xinyun"),  # 古绝: no tonal pattern
        (CHUN_XIAO, "gujue", "xinyun"),  # 古绝 on 仄声 rhymes
        (ZAO_FA, "qijue", "xinyun"),
        (JING_YE_SI, "gujue", "pingshui"),
        (CHUN_XIAO, "gujue", "pingshui"),
        (ZAO_FA, "qijue", "pingshui"),
        (CHUN_WANG, "wulv", "pingshui"),
        (DENG_GAO, "qilv", "pingshui"),
    ],
)
def test_real_chinese_poems_fit_their_forms(text, form, rhymes):
    report = check(text, resolve_form(form), rhymes=rhymes)
    assert report.ok, report.problems


@pytest.mark.parametrize("rhymes", ["xinyun", "pingshui"])
@pytest.mark.parametrize("text, form", [(JING_YE_SI, "wujue"), (CHUN_XIAO, "wujue"), (HUANG_HE_LOU, "qilv")])
def test_ancient_style_poems_are_not_regulated_verse(text, form, rhymes):
    """静夜思 and 春晓 are 古绝, 黄鹤楼 a famous 拗律: the tonal pattern refuses them; --tones off
    (lines, characters, rhyme only) accepts them as before."""
    report = check(text, resolve_form(form), rhymes=rhymes)
    assert any("expected" in p for p in report.problems), report.problems
    assert check(text, resolve_form(form), rhymes=rhymes, tones="off").ok

@pytest.mark.parametrize("text, line", [(CHUN_WANG, 8), (DENG_GAO, 4)])
def test_modern_rhymes_reject_what_only_the_classical_book_rhymes(text, line):
    report = check(text, resolve_form("wulv" if text is CHUN_WANG else "qilv"), rhymes="xinyun")
    assert any(p.startswith(f"line {line}: does not rhyme") for p in report.problems), report.problems


def test_a_couplet_per_printed_line_is_two_verse_lines():
    assert verse_lines(JING_YE_SI) == ["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。"]
    assert verse_lines("「床前明月光」\n疑是地上霜") == ["床前明月光", "疑是地上霜"]


def test_mixed_tone_classes_do_not_rhyme():
    # 光 (平) and 上 (仄) share the 唐 group but not a tone class
    report = check("床前明月光，疑是地上霜。举头望明月，低头思故上。", resolve_form("wujue"))
    assert any("does not rhyme" in p for p in report.problems), report.problems


def test_check_command_accepts_a_real_poem_and_the_rhyme_book(cli, tmp_path):
    f = tmp_path / "chunwang.txt"
    f.write_text(CHUN_WANG, encoding="utf-8")
    assert cli("poem", "--check", str(f), "--form", "wulv").exit_code == 1
    r = cli("poem", "--check", str(f), "--form", "wulv", "--rhymes", "pingshui")
    assert r.exit_code == 0, r.stdout + r.stderr
    haiku = tmp_path / "basho.txt"
    haiku.write_text(BASHO)
    r = cli("poem", "--check", str(haiku), "--form", "haiku", "--annotate", "--format", "jsonl")
    assert r.exit_code == 0, r.stderr
