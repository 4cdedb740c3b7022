"""The built-in tiny random models, built in-process: deterministic, no download, for smoke tests.

`tiny-random`: a tiny GPT-2 with a byte-level BPE tokenizer whose merges make ~280 common English
words single tokens (so word-level constraints such as poem forms work). `tiny-random-zh`: the
same model shape with a BERT-style vocabulary of ~190 hanzi, one token per character, like the
Chinese GPT-2 poem models. Their weights are random, so their output is gibberish by design.
"""

from __future__ import annotations

from typing import Any

TINY_MODEL_ID = "tiny-random"
TINY_ZH_MODEL_ID = "tiny-random-zh"
TINY_MODELS = (TINY_MODEL_ID, TINY_ZH_MODEL_ID)
_SEED = 20261123

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


def build_tiny(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 1024) -> tuple[Any, Any]:
    """(model, tokenizer) for `tiny-random`; the same weights on every call."""
    from transformers import GPT2Tokenizer

    vocab, merges, words = english_vocab()
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # typed list[str]; BPE wants (a, b) pairs
    favoured = [i for t, i in vocab.items() if t in words] + list(range(32, 127)) + [10]
    model = _random_gpt2(len(vocab), tokenizer.eos_token_id, favoured, n_layer, n_embd, n_head, n_positions)
    return model, tokenizer


def build_tiny_zh(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 512) -> tuple[Any, Any]:
    """(model, tokenizer) for `tiny-random-zh`: one token per hanzi, BERT-style special tokens."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。", *dict.fromkeys(HANZI)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    favoured = list(range(5, len(tokens)))
    model = _random_gpt2(len(tokens), tokenizer.sep_token_id, favoured, n_layer, n_embd, n_head, n_positions)
    return model, tokenizer


def _random_gpt2(vocab_size: int, eos: int, favoured: list[int], n_layer: int, n_embd: int, n_head: int, n_positions: int) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,  # tied random embeddings make the model repeat its last token forever
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            # Larger logits than the default init, so sampling settings visibly matter ...
            model.transformer.wte.weight.mul_(5.0)
            head = model.lm_head.weight
            head.mul_(8.0)
            # ... and a bias through ln_f towards the favoured tokens (words, printable ASCII),
            # so that the gibberish is mostly words rather than invalid UTF-8 and control codes.
            column = torch.full((vocab_size,), -1.0)
            column[favoured] = 1.0
            head[:, 0] = column
            model.transformer.ln_f.bias[0] = 3.0
    return model.eval()


def build(name: str) -> tuple[Any, Any]:
    return build_tiny_zh() if name == TINY_ZH_MODEL_ID else build_tiny()
