"""The built-in tiny models without transformers: their weights equal, tensor by tensor and bit for
bit, what transformers' GPT2LMHeadModel builds from the same seed; their tokenizers encode and
decode as transformers' GPT2Tokenizer / BertTokenizer do; loading them never imports transformers."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aigc_cli.models import tiny

ROOT = Path(__file__).resolve().parent.parent
NAMES = (tiny.TINY_MODEL_ID, tiny.TINY_ZH_MODEL_ID)


def reference_weights(s: tiny.Spec) -> dict[str, torch.Tensor]:
    """The weights as the built-in models were built before they were drawn natively: transformers
    initializes GPT2LMHeadModel from the seed, then the same edits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny._SEED)
        model = GPT2LMHeadModel(GPT2Config(**s.hf_config()))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(5.0)
        head = model.lm_head.weight
        head.mul_(8.0)
        column = torch.full((s.vocab_size,), -1.0)
        column[list(s.favoured)] = 1.0
        head[:, 0] = column
        model.transformer.ln_f.bias[0] = 3.0
    return model.state_dict()


def assert_same_tensors(native: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(native) == list(reference)
    for name, tensor in reference.items():
        assert native[name].dtype == tensor.dtype and native[name].shape == tensor.shape, name
        assert torch.equal(native[name], tensor), name


@pytest.mark.parametrize("name", NAMES)
def test_native_weights_are_transformers_weights_bit_for_bit(name):
    s = tiny.spec(name)
    assert_same_tensors(tiny.weights(s), reference_weights(s))


def test_the_init_order_holds_for_other_shapes():
    """The scaled residual init depends on the number of layers and the draws on every shape."""
    for shape in ({"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64}, {"n_layer": 1, "n_embd": 48, "n_head": 3}):
        s = tiny.spec(tiny.TINY_MODEL_ID, **shape)
        assert_same_tensors(tiny.weights(s), reference_weights(s))


def test_building_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny.weights(tiny.spec(tiny.TINY_MODEL_ID))
    tiny.hf_model(tiny.spec(tiny.TINY_ZH_MODEL_ID))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_transformers_model_for_finetuning_has_the_native_weights(name):
    from transformers import GPT2LMHeadModel

    model, tokenizer = tiny.build_hf(name)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert_same_tensors(dict(model.state_dict()), tiny.weights(tiny.spec(name)))
    assert len(tokenizer) == tiny.spec(name).vocab_size == model.config.vocab_size


CORPUS = [
    "",
    "Hello, how are you?",
    "the sea is deep and the night is long",
    " The Moon over the quiet river, golden and silver.",
    "zebra quantum xylophone antidisestablishmentarianism Pneumonoultramicroscopic",
    "It's 3.14159 o'clock; we're 100% sure (or 99.9%?) -- no!! $42, #1, @home, a+b=c, x^2 <= y/z",
    "Spaced , punctuation . It 's done , is n't it ? I 'm sure ! they 've gone ; we 're here ' quoted ' ok",
    "line one\nline two\r\n\ttabbed\n\n  double  spaces   and trailing   ",
    "emoji 😀👍🏽 🇫🇷 ❤️ and ZWJ 👨‍👩‍👧",
    "naïve café Ünïcödé façade São Paulo Ελληνικά русский עברית العربية हिन्दी 日本語のテキスト 한국어",
    "control \x00\x01\x07\x1b[31m\x7f\u200b\u200d\ufeff chars",
    "<|endoftext|> special in the middle <|endoftext|>",
    "春风吹过山，江水向东流。",
    "明月 照 高楼 ， 故人 何处 归 。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "（全角括号）【方括号】「引号」！？；：、“双引号”‘单引号’……——",
    "山水GPT-2模型abc测试123，Hello世界。",
    "ＡＢＣ１２３　全角字母和空格",
    "[CLS] 春 [SEP] 秋 [MASK] [PAD] [UNK] 冬",
    "龘 𠀀 𪚥 繁體字 鬱",
    "a" * 150 + " " + "春" * 120,
]


@pytest.fixture(scope="module", params=NAMES)
def both(request):
    """(native tokenizer, transformers' tokenizer as the built-in models built it before)."""
    return tiny.tokenizer(request.param), tiny.hf_tokenizer(request.param)


def test_the_backend_tokenizers_are_the_same(both):
    native, hf = both
    assert json.loads(native._tok.to_str()) == json.loads(hf.backend_tokenizer.to_str())


def test_special_tokens_and_sizes_match(both):
    native, hf = both
    for attr in ("eos_token", "bos_token", "pad_token", "sep_token", "unk_token"):
        assert getattr(native, attr) == getattr(hf, attr), attr
        assert getattr(native, attr + "_id") == getattr(hf, attr + "_id"), attr
    assert len(native) == len(hf)
    assert native.get_vocab() == hf.get_vocab()


def _as_people_write(text: str) -> str:
    """transformers' BertTokenizer decoding (tokens joined by spaces) with every space that is not
    between two Latin letters or digits removed: Chinese as it is written (the rule aigc decodes by)."""
    return re.sub(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", "", text)


def test_encode_decode_match_on_a_varied_corpus(both):
    native, hf = both
    for text in CORPUS:
        fitted = native.fit(text) if native.wordpiece else text  # "," typed where the vocabulary has "，"
        for special in (False, True):
            ids = native.encode(text, add_special_tokens=special)
            assert ids == hf.encode(fitted, add_special_tokens=special), (text, special)
        ids = native.encode(text, add_special_tokens=False)
        assert native.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids), text
        for skip in (False, True):
            for clean in (False, True):
                got = native.decode(ids, clean_up_tokenization_spaces=clean, skip_special_tokens=skip)
                if native.wordpiece:  # no spaces between characters, special tokens left out
                    assert got == _as_people_write(hf.decode(ids, skip_special_tokens=True)), (text, got)
                else:
                    assert got == hf.decode(ids, clean_up_tokenization_spaces=clean, skip_special_tokens=skip), (text, skip, clean)


def test_decoding_any_ids_matches(both):
    """Sequences no text encodes to: byte tokens that are not UTF-8, special tokens anywhere, single tokens."""
    native, hf = both
    size = len(hf)
    rng = random.Random(0)
    rows = [[rng.randrange(size) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    rows += [[i] for i in range(size)]
    for row in rows:
        if native.wordpiece:
            assert native.decode(row) == _as_people_write(hf.decode(row, skip_special_tokens=True)), row
            continue
        assert native.decode(row, clean_up_tokenization_spaces=False) == hf.decode(row, clean_up_tokenization_spaces=False), row
        assert native.decode(row, skip_special_tokens=True) == hf.decode(row, skip_special_tokens=True), row
        assert native.decode(row, clean_up_tokenization_spaces=True) == hf.decode(row, clean_up_tokenization_spaces=True), row
    if not native.wordpiece:
        assert native.batch_decode(rows, clean_up_tokenization_spaces=False) == hf.batch_decode(rows, clean_up_tokenization_spaces=False)
        assert native.decode(7) == hf.decode(7)
    assert native.convert_ids_to_tokens(list(range(size))) == hf.convert_ids_to_tokens(list(range(size)))
    assert all(native.convert_ids_to_tokens(i) == hf.convert_ids_to_tokens(i) for i in range(size))


def _fresh_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`code` run by a new Python process in the repository (nothing imported yet)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_loading_a_builtin_model_never_imports_transformers():
    code = (
        "import sys\n"
        "from aigc_cli.models.loading import load, load_tokenizer\n"
        "lm = load('tiny-random'); zh = load('tiny-random-zh'); load_tokenizer('tiny-random-zh')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert lm.revision == zh.revision == 'builtin'\n"
        "print(type(lm.tokenizer).__name__, lm.tokenizer.pad_token_id, zh.tokenizer.pad_token_id)\n"
    )
    r = _fresh_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["FastTokenizer", "256", "0"]


def test_loading_imports_torch_with_the_collector_paused_then_freezes_what_is_alive():
    """A command's first load imports torch with Python's cyclic collector paused (its ~170k
    objects set off three full collections, 0.12 s of start-up), then freezes what is alive and
    turns collection back on; a second load in the same process changes nothing."""
    code = (
        "import gc, sys\n"
        "from aigc_cli.models.loading import load\n"
        "full = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and info['generation'] == 2 and full.append(1))\n"
        "assert 'torch' not in sys.modules\n"
        "load('tiny-random')\n"
        "assert gc.isenabled(), 'the collector was left off'\n"
        "frozen = gc.get_freeze_count()\n"
        "assert frozen > 50_000, frozen\n"
        "assert not full, f'{len(full)} full collections'\n"
        "load('tiny-random')\n"
        "assert gc.get_freeze_count() == frozen\n"
    )
    r = _fresh_python(code)
    assert r.returncode == 0, r.stderr


def test_generating_from_the_cli_never_imports_transformers(tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.argv = ['aigc', 'generate', 'Hello, how are you?', '-n', '2', '--max-new-tokens', '5', '--seed', '1', '--model', 'tiny-random']\n"
        "try:\n"
        "    runpy.run_module('aigc_cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    r = _fresh_python(code, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello, how are you?") >= 1


@pytest.mark.parametrize("name", NAMES)
def test_the_loaded_model_has_the_native_weights_and_builds_transformers_on_demand(name):
    from aigc_cli.models.loading import load

    lm = load(name)
    assert lm.native and lm._hf is None and lm.revision == "builtin"
    hf = lm.hf_model  # built when asked for, from the same weights
    assert_same_tensors(dict(hf.state_dict()), tiny.weights(tiny.spec(name)))
    assert hf.generation_config.pad_token_id == lm.tokenizer.pad_token_id == (256 if name == tiny.TINY_MODEL_ID else 0)
    ids = torch.tensor([lm.tokenizer.encode("Hello, how are you? 春风吹过山。", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, hf(ids).logits, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_load_trainable_returns_transformers_with_the_native_weights(name):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

    from aigc_cli.models.loading import load_trainable

    model, tokenizer, context = load_trainable(name, "cpu")
    assert isinstance(model, GPT2LMHeadModel) and model.training and isinstance(tokenizer, PreTrainedTokenizerBase)
    assert context == tiny.spec(name).n_positions
    assert_same_tensors(dict(model.state_dict()), tiny.weights(tiny.spec(name)))
