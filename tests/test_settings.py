"""Settings validation: every bad value names its flag; defaults resolve per decoding mode."""

import pytest

from aigc_cli.core.errors import UsageError
from aigc_cli.core.settings import Decoding, GenerationSettings as S


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"min_new_tokens": -1}, "--min-new-tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 5}, "--min-new-tokens"),
        ({"num_sequences": 0}, "-n/--num-sequences"),
        ({"temperature": -0.5}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"typical_p": 0.0}, "--typical-p"),
        ({"min_p": 2.0}, "--min-p"),
        ({"top_k": -1}, "--top-k"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"no_repeat_ngram_size": -2}, "--no-repeat-ngram-size"),
        ({"penalty_alpha": 1.5}, "--penalty-alpha"),
        ({"stop": ("",)}, "--stop"),
        ({"ban": (" ",)}, "--ban"),
        ({"decoding": Decoding.beam, "num_beams": 2, "num_sequences": 3}, "-n/--num-sequences"),
        ({"decoding": Decoding.beam, "num_beams": 1}, "--num-beams"),
        ({"decoding": Decoding.greedy, "num_sequences": 2}, "-n/--num-sequences"),
        ({"decoding": Decoding.contrastive, "num_sequences": 2}, "-n/--num-sequences"),
        ({"temperature": 0.0, "num_sequences": 3}, "--temperature"),
        ({"num_beams": 4}, "--num-beams"),
        ({"decoding": Decoding.contrastive, "top_k": 0}, "--top-k"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(UsageError) as err:
        S(**kwargs).resolved()
    assert err.value.message.startswith(flag + ":"), err.value.message


def test_mode_defaults():
    assert S().resolved().top_k == 50
    assert S(decoding=Decoding.contrastive).resolved().top_k == 4
    assert S(decoding=Decoding.beam, num_sequences=6).resolved().num_beams == 6
    assert S(decoding=Decoding.beam).resolved().num_beams == 4
    assert S(temperature=0).resolved().decoding is Decoding.greedy
    assert S(decoding=Decoding.greedy).resolved().top_k is None


def test_settings_are_hashable_and_frozen():
    a, b = S(stop=("x",)).resolved(), S(stop=("x",)).resolved()
    assert hash(a) == hash(b) and a == b
    with pytest.raises(AttributeError):
        a.top_k = 3  # type: ignore[misc]


def test_settings_errors_are_keyed_by_field_and_rendered_as_flags():
    from aigc_cli.core.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        S(top_p=2.0).resolved()
    assert err.value.field == "top_p" and err.value.message.startswith("--top-p: ")
    with pytest.raises(SettingsError) as err:
        S(decoding="greedy", num_sequences=3).resolved()
    assert err.value.field == "num_sequences" and err.value.message.startswith("-n/--num-sequences: ")


def test_every_decoding_mode_is_described_once():
    from aigc_cli.core.settings import MODES, Decoding

    assert set(MODES) == set(Decoding)
    beam = S(decoding="beam", num_beams=6).resolved()
    contrastive = S(decoding="contrastive", top_k=5).resolved()
    assert (beam.kv_rows(), contrastive.kv_rows(), S().resolved().kv_rows()) == (6, 5, 1)
    assert S().resolved().top_k == 50 and contrastive.mode.runs_on == "scheduler" and beam.mode.runs_on == "beam"
