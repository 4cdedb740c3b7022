"""The built-in tiny random models, built in-process: deterministic, no download, for smoke tests.

`tiny-random`: a tiny GPT-2 with a byte-level BPE tokenizer whose merges make ~280 common English
words single tokens (so word-level constraints such as poem forms work). `tiny-random-zh`: the
same model shape with a BERT-style vocabulary of ~190 hanzi, one token per character, like the
Chinese GPT-2 poem models. Their weights are random, so their output is gibberish by design.

Generating and scoring with them never imports transformers (it costs seconds of start-up): the
weights are drawn with plain torch in the order transformers' `GPT2LMHeadModel(config)` draws
them (so they equal, bit for bit, what transformers 5.x builds from the same seed), and the
tokenizers are built with the `tokenizers` library exactly as transformers' `GPT2Tokenizer` and
`BertTokenizer` build theirs. Fine-tuning gets transformers' model and tokenizer, loaded with the
same weights (`build_hf`). tests/test_tiny.py checks all three against transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from aigc_cli.core.tokenizer import FastTokenizer
    from aigc_cli.models.gpt2 import Config

TINY_MODEL_ID = "tiny-random"
TINY_ZH_MODEL_ID = "tiny-random-zh"
TINY_MODELS = (TINY_MODEL_ID, TINY_ZH_MODEL_ID)
_SEED = 20261123
_INITIALIZER_RANGE = 0.02  # GPT2Config's default initializer_range
_ZH_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

WORDS = """
the a an and of to in on at by for with from as is was are be been it its this that his her their our my your
we you they he she i me us him them all one no not but or so if when where while how what who why then than
there here now yet still just only also very more most some many each every any much such own same other
day way say play stay may gray away today pray lay night light bright sight might right white flight delight
tonight sea free tree see thee three key agree sky high fly eye why lie die cry sigh goodbye love above dove
glove heart art part start apart rain again pain plain main remain train song long along strong wrong belong
time rhyme climb chime fire desire higher sun run done fun begun moon soon tune june noon home roam foam dome
cold gold old bold told hold dream stream gleam seem beam star far car sing ring spring wing king bring thing
fall call small wall tall blue true through new knew door before shore floor grace place face space
race breeze trees seas go snow slow know flow glow below ground sound around found deep sleep keep sweep green
seen between land hand stand sand wind river morning golden silver beautiful forever shadow winter summer
evening silent gentle flower water mountain ocean over under little alone window garden quiet autumn yellow
hollow memory melody harmony wonder thunder wander soft warm dark wild sweet cool leaf leaves bird birds wave
waves cloud clouds field fields rose roses walk walks sings dance falls rise rises
""".split()

HANZI = (
    "春夏秋冬山水风月花鸟云雨雪霜天地日星江河湖海人家心中时年来去归飞流清明高长深远青白红寒香声光生东西南北"
    "前后上下里外门窗楼台城村路桥舟船琴书诗酒茶梦愁思情看听行坐起落开满空新古今千万一两三几多少不无有是在为与同"
    "夜晨晚朝暮阳阴烟尘沙石林木草叶枝根松竹梅兰菊柳桃杏歌吟唱笑啼鸣呼望见知闻忆留回还如似自何谁此"
    "孤独闲幽静乡关边亭池泉溪波浪涛峰岭岩谷君我尔吾他客友故旧老儿女将军王侯"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character mapping."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def english_vocab() -> tuple[dict[str, int], list[tuple[str, str]], set[str]]:
    """(vocab, merges, whole-word tokens): 256 bytes, <|endoftext|> = 256, then word prefixes.

    Each word gets " word" and "Word" forms; merges only ever extend a word's own prefix, so
    every listed word encodes as one token whatever its neighbours.
    """
    chars = _byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    space = chars[ord(" ")]
    forms = []
    for word in dict.fromkeys(WORDS):
        forms += [space + word, word.capitalize()]
    merges: list[tuple[str, str]] = []
    for length in range(2, max(len(f) for f in forms) + 1):  # shorter prefixes first
        for f in forms:
            if len(f) >= length and f[:length] not in vocab:
                merges.append((f[: length - 1], f[length - 1]))
                vocab[f[:length]] = len(vocab)
    return vocab, merges, set(forms)


def chinese_vocab() -> dict[str, int]:
    """[PAD] [UNK] [CLS] [SEP] [MASK], the two full-width punctuation marks, then one token per hanzi."""
    tokens = [*_ZH_SPECIAL, "，", "。", *dict.fromkeys(HANZI)]
    return {t: i for i, t in enumerate(tokens)}


@dataclass(frozen=True)
class Spec:
    """What defines one tiny model: its GPT-2 shape, its end-of-text token and the tokens its LM
    head favours."""

    vocab_size: int
    eos: int
    favoured: tuple[int, ...]
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 1024

    def hf_config(self) -> dict[str, Any]:
        """The GPT2Config arguments (everything else is GPT2Config's default)."""
        return {
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "bos_token_id": self.eos,
            "eos_token_id": self.eos,
            "tie_word_embeddings": False,  # tied random embeddings make the model repeat its last token forever
        }

    def config(self) -> Config:
        """aigc's native GPT-2 config of this model (layer_norm_epsilon and the rest: GPT2Config's defaults)."""
        from aigc_cli.models.gpt2 import Config

        cfg = Config.from_hf({"model_type": "gpt2", **self.hf_config()})
        assert cfg is not None
        return cfg


def spec(name: str, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int | None = None) -> Spec:
    """The built-in model `name`'s definition (the shape arguments are for tests and benchmarks)."""
    if name == TINY_ZH_MODEL_ID:
        vocab = chinese_vocab()
        favoured = tuple(range(len(_ZH_SPECIAL), len(vocab)))
        return Spec(len(vocab), vocab["[SEP]"], favoured, n_layer, n_embd, n_head, n_positions or 512)
    if name != TINY_MODEL_ID:
        raise ValueError(f"not a built-in model: {name!r}")
    en, _, words = english_vocab()
    favoured = (*(i for t, i in en.items() if t in words), *range(32, 127), 10)
    return Spec(len(en), en["<|endoftext|>"], favoured, n_layer, n_embd, n_head, n_positions or 1024)


def weights(s: Spec) -> dict[str, torch.Tensor]:
    """The model's float32 tensors, named as in `GPT2LMHeadModel.state_dict()` and equal to what
    `GPT2LMHeadModel(GPT2Config(**s.hf_config()))` holds after `torch.manual_seed(_SEED)`, then
    edited as below. Drawn from a generator of their own: the global RNG is not touched.

    transformers 5.x draws, in this order: while constructing the modules, wte and wpe
    (nn.Embedding: N(0, 1)) and, per block, c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D:
    N(0, 0.02)); then GPT2Model.post_init re-initializes children before parents: wte, wpe
    (N(0, 0.02)), per block c_attn, attn.c_proj, attn.c_proj again (GPT2Attention: N(0, 0.02 /
    sqrt(2 n_layer))), c_fc, mlp.c_proj, mlp.c_proj again (GPT2MLP: scaled); LayerNorms are ones
    and zeros, biases zeros. Then lm_head is constructed (nn.Linear: kaiming-uniform) and
    GPT2LMHeadModel.post_init draws it again (N(0, 0.02)); the transformer is not drawn again.
    Draws that are overwritten still advance the generator, so they are made and dropped.
    """
    import torch

    e, inner, std = s.n_embd, 4 * s.n_embd, _INITIALIZER_RANGE
    scaled = std / math.sqrt(2 * s.n_layer)
    gen = torch.Generator().manual_seed(_SEED)

    def normal(rows: int, cols: int, sd: float) -> torch.Tensor:
        return torch.empty(rows, cols, dtype=torch.float32).normal_(0.0, sd, generator=gen)

    normal(s.vocab_size, e, 1.0), normal(s.n_positions, e, 1.0)  # construction: nn.Embedding
    for _ in range(s.n_layer):  # construction: Conv1D
        normal(e, 3 * e, std), normal(e, e, std), normal(e, inner, std), normal(inner, e, std)
    out = {"transformer.wte.weight": normal(s.vocab_size, e, std), "transformer.wpe.weight": normal(s.n_positions, e, std)}
    for i in range(s.n_layer):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = torch.ones(e), torch.zeros(e)
        out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = normal(e, 3 * e, std), torch.zeros(3 * e)
        normal(e, e, std)  # Conv1D's init, then GPT2Attention's scaled one
        out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = normal(e, e, scaled), torch.zeros(e)
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = torch.ones(e), torch.zeros(e)
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = normal(e, inner, std), torch.zeros(inner)
        normal(inner, e, std)  # Conv1D's init, then GPT2MLP's scaled one
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = normal(inner, e, scaled), torch.zeros(e)
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = torch.ones(e), torch.zeros(e)
    torch.nn.init.kaiming_uniform_(torch.empty(s.vocab_size, e), a=math.sqrt(5), generator=gen)  # nn.Linear's own init
    head = out["lm_head.weight"] = normal(s.vocab_size, e, std)

    # Larger logits than the default init, so sampling settings visibly matter ...
    out["transformer.wte.weight"].mul_(5.0)
    head.mul_(8.0)
    # ... and a bias through ln_f towards the favoured tokens (words, printable ASCII),
    # so that the gibberish is mostly words rather than invalid UTF-8 and control codes.
    column = torch.full((s.vocab_size,), -1.0)
    column[list(s.favoured)] = 1.0
    head[:, 0] = column
    out["transformer.ln_f.bias"][0] = 3.0
    return out


def tokenizer(name: str) -> FastTokenizer:
    """The model's tokenizer through the `tokenizers` library, built as transformers' GPT2Tokenizer
    (`tiny-random`) or BertTokenizer (`tiny-random-zh`) builds its backend, with their special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    from aigc_cli.core.tokenizer import FastTokenizer, bert_wordpiece

    if name == TINY_ZH_MODEL_ID:
        return bert_wordpiece(chinese_vocab(), lowercase=True)
    if name != TINY_MODEL_ID:
        raise ValueError(f"not a built-in model: {name!r}")
    en, merges, _ = english_vocab()
    tok = Tokenizer(BPE(vocab=en, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    eot = "<|endoftext|>"
    tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return FastTokenizer(tok, eos_token=eot, bos_token=eot, unk_token=eot)


def hf_tokenizer(name: str) -> Any:
    """transformers' tokenizer of the model (fine-tuning saves it with the model): GPT2Tokenizer
    or BertTokenizer over the same vocabulary."""
    if name == TINY_ZH_MODEL_ID:
        from transformers import BertTokenizer

        return BertTokenizer(vocab=chinese_vocab())
    from transformers import GPT2Tokenizer

    vocab, merges, _ = english_vocab()
    return GPT2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # typed list[str]; BPE wants (a, b) pairs


def hf_model(s: Spec, state: dict[str, torch.Tensor] | None = None) -> Any:
    """transformers' GPT2LMHeadModel with the model's weights (`weights(s)` unless given), in eval mode.
    Its own initialization draws from a forked RNG, so the global one is left as it was."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        model = GPT2LMHeadModel(GPT2Config(**s.hf_config()))
    model.load_state_dict(weights(s) if state is None else state)
    return model.eval()


def build_hf(name: str) -> tuple[Any, Any]:
    """(transformers model, transformers tokenizer) of a built-in model: for fine-tuning and tests."""
    return hf_model(spec(name)), hf_tokenizer(name)


def build_tiny(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 1024) -> tuple[Any, Any]:
    """(transformers model, tokenizer) for `tiny-random`; the same weights on every call."""
    return hf_model(spec(TINY_MODEL_ID, n_layer, n_embd, n_head, n_positions)), hf_tokenizer(TINY_MODEL_ID)


def build_tiny_zh(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 512) -> tuple[Any, Any]:
    """(transformers model, tokenizer) for `tiny-random-zh`: one token per hanzi, BERT-style special tokens."""
    return hf_model(spec(TINY_ZH_MODEL_ID, n_layer, n_embd, n_head, n_positions)), hf_tokenizer(TINY_ZH_MODEL_ID)
