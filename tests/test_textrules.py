"""Stop strings, stream hold-back and banned-word detection on plain text."""

from aigc_cli.core.textrules import BanRule, find_stop, stream_safe_length


def test_find_stop_earliest():
    assert find_stop("abc\ndef END", ["END", "\n"]) == 3
    assert find_stop("abc", ["x"]) is None


def test_stream_holds_back_partial_stop_and_partial_char():
    assert stream_safe_length("hello EN", ["END"]) == len("hello ")
    assert stream_safe_length("hello", ["END"]) == 5
    assert stream_safe_length("caf\ufffd", []) == 3


def test_ban_whole_word_any_case_end_counts_as_boundary():
    rule = BanRule(["cat"])
    assert rule.violated("the ", "the Cat")
    assert rule.violated("the c", "the cat.")
    assert not rule.violated("the ", "the catalogue")
    assert not rule.violated("con", "concat!")
    assert not rule.violated("the cat sat", "the cat sat on")  # an old occurrence is not new
    assert not BanRule([])


def test_ban_phrase():
    rule = BanRule(["New York"])
    assert rule.violated("in new ", "in new york")
    assert not rule.violated("in new ", "in new yorker")
