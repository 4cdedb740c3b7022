"""Tokenizers through the `tokenizers` library directly (a model directory's tokenizer.json, or a BERT
vocab.txt as Chinese GPT-2 models ship it): the small part of the transformers tokenizer API that
aigc uses, without importing transformers at start-up.

Text from a BERT-style vocabulary is written as people write it: CJK characters and punctuation
joined without spaces, WordPiece's "##" pieces joined to their word, a space kept only between
two Latin words or numbers, special tokens left out; and on the way in, a character the
vocabulary lacks is replaced by its full- or half-width form when the vocabulary has that one
(a "，" typed where the vocabulary has ","), instead of becoming [UNK]."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from aigc_cli.core import jsondata
from aigc_cli.core.errors import ModelUnavailableError


class Tokenizer(Protocol):
    """The part of a tokenizer aigc uses: FastTokenizer below, or a transformers tokenizer."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], clean_up_tokenization_spaces: bool = ...) -> str: ...

    def __len__(self) -> int: ...

    def get_vocab(self) -> dict[str, int]: ...

    def convert_ids_to_tokens(self, ids: Any) -> Any: ...


class FastTokenizer:
    """A `tokenizers.Tokenizer` with the special tokens transformers' tokenizer would name.

    `clean_up_tokenization_spaces` is accepted and ignored: transformers skips that clean-up for
    BPE models, and a WordPiece decoder with `cleanup` (BERT's) has already made the same
    replacements."""

    def __init__(
        self,
        tok: Any,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        sep_token: str | None = None,
        unk_token: str | None = None,
        cls_token: str | None = None,
        mask_token: str | None = None,
    ) -> None:
        self._tok = tok
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.sep_token = sep_token
        self.unk_token = unk_token
        self.cls_token = cls_token
        self.mask_token = mask_token
        from tokenizers import models

        self.wordpiece = isinstance(tok.model, models.WordPiece)
        self._specials = {x for x in (eos_token, bos_token, pad_token, sep_token, unk_token, cls_token, mask_token) if x}
        self._vocab: dict[str, int] | None = None
        self._widths: dict[int, str] | None = None  # fit's table
        self._lowercase = self.wordpiece and _lowercases(tok)

    @classmethod
    def from_dir(cls, path: Path, tok: Any = None) -> FastTokenizer:
        """A model directory's tokenizer.json (or `tok`, already read from it), with the special
        tokens its tokenizer_config.json names."""
        if tok is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _json_object(path / "tokenizer_config.json")
        names = ("eos_token", "bos_token", "pad_token", "sep_token", "unk_token", "cls_token", "mask_token")
        special = {k: _content(config.get(k)) for k in names}
        return cls(tok, **special)

    def _id(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def sep_token_id(self) -> int | None:
        return self._id(self.sep_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def cls_token_id(self) -> int | None:
        return self._id(self.cls_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.wordpiece:
            text = self.fit(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in it (a character that
        byte-level BPE splits over tokens gives each of them the character's span)."""
        enc = self._tok.encode(self.fit(text) if self.wordpiece else text, add_special_tokens=False)
        return list(enc.ids), [tuple(span) for span in enc.offsets]

    def fit(self, text: str) -> str:
        """`text` with each character the vocabulary lacks replaced by its full- or half-width
        form where the vocabulary has that one (WordPiece vocabularies keep one form of many)."""
        if self._widths is None:  # the characters to swap, found once: then one str.translate per text
            vocab = self._known()
            known = (lambda c: c.lower() in vocab) if self._lowercase else (lambda c: c in vocab)
            candidates = [chr(c) for c in (*range(0x21, 0x7F), *range(0xFF01, 0xFF5F))] + list(_WIDE_EXTRA)
            self._widths = {}
            for ch in candidates:
                other = _other_width(ch)
                if other is not None and not known(ch) and known(other):
                    self._widths[ord(ch)] = other
        return text.translate(self._widths)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token string (byte-level BPE writes one character
        per byte): no token of any text stands for more characters than this. The loader works it
        out in its tokenizer thread while the weights load (GPT-2's vocabulary: 0.03 s)."""
        return max(map(len, self.get_vocab()), default=1)

    def _known(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.get_vocab()
        return self._vocab

    def decode(self, ids: Any, clean_up_tokenization_spaces: bool = False, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        if self.wordpiece:
            return join_wordpiece(self.convert_ids_to_tokens(list(ids)), self._specials)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pieces(self, ids: list[int], before: int | None = None) -> list[str]:
        """What each token adds to `decode(ids)`, in order (joined, they are that text); `before`
        is the token just before them, whose end decides a WordPiece token's leading space. A
        special token adds nothing to a WordPiece text; byte-level BPE tokens are decoded one by one."""
        if not self.wordpiece:
            return [self.decode([i]) for i in ids]
        tokens = self.convert_ids_to_tokens(list(ids))
        after_word = False
        if before is not None:
            last = join_wordpiece([self.convert_ids_to_tokens(before)], self._specials)
            after_word = _latin(last[-1:])
        out = []
        for token in tokens:
            piece = join_wordpiece([token], self._specials)
            if piece and after_word and _latin(piece[:1]) and not (token or "").startswith("##"):
                piece = " " + piece
            out.append(piece)
            if piece:
                after_word = _latin(piece[-1:])
        return out

    def typed_pieces(self, text: str) -> list[str] | None:
        """For a WordPiece vocabulary, each token's stretch of `text` as the user typed it (the
        whitespace before it included): an [UNK] shows the character typed, a folded full-width
        comma the comma typed, and the pieces join to the text. None for byte-level BPE, whose
        tokens decode to their own pieces (`pieces`)."""
        if not self.wordpiece:
            return None
        _, spans = self.encode_spans(text)
        return stretches(text, [end for _, end in spans])

    def batch_decode(self, rows: Any, clean_up_tokenization_spaces: bool = False, skip_special_tokens: bool = False) -> list[str]:
        if self.wordpiece:
            return [self.decode(r) for r in rows]
        return self._tok.decode_batch([list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]


def stretches(text: str, ends: Sequence[int]) -> list[str]:
    """`text` cut at each token's end (the characters before a token's span, spaces say, go with
    it; a token ending where the last one did gets ""), the rest after the last token going with
    that one: the pieces join to `text` exactly."""
    out, done = [], 0
    for e in ends:
        out.append(text[done:e] if e > done else "")
        done = max(done, e)
    if out:
        out[-1] += text[done:]  # text no token covers (trailing spaces a tokenizer drops)
    return out


def join_wordpiece(tokens: list[str | None], specials: set[str]) -> str:
    """WordPiece tokens as people write the text: no space around CJK characters and punctuation,
    "##" pieces joined to their word, one space between two Latin words or numbers, special tokens
    left out."""
    out: list[str] = []
    after_word = False  # the text so far ends in a Latin letter or digit
    for token in tokens:
        if token is None or token in specials:
            continue
        if token.startswith("##") and len(token) > 2:
            piece = token[2:]
        else:
            piece = token
            if after_word and _latin(piece[:1]):
                out.append(" ")
        out.append(piece)
        after_word = _latin(piece[-1:])
    return "".join(out)


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _other_width(ch: str) -> str | None:
    """The half-width form of a full-width character, or the full-width form of a half-width one
    (ASCII punctuation, letters and digits; the ideographic space and comma family)."""
    code = ord(ch)
    if 0xFF01 <= code <= 0xFF5E:
        return chr(code - 0xFEE0)
    if 0x21 <= code <= 0x7E:
        return chr(code + 0xFEE0)
    return _WIDE_EXTRA.get(ch)


_WIDE_EXTRA = {"。": ".", "、": ",", "「": '"', "」": '"'}  # full-width forms outside U+FF01-FF5E


def _lowercases(tok: Any) -> bool:
    """Whether a WordPiece tokenizer's normalizer lowercases (BERT's uncased vocabularies)."""
    try:
        import json

        return bool(json.loads(tok.to_str()).get("normalizer", {}).get("lowercase", False))
    except (ValueError, AttributeError, TypeError):
        return False


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_wordpiece(vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None) -> FastTokenizer:
    """A BERT WordPiece tokenizer as transformers' BertTokenizer builds its backend (the basic
    tokenizer's normalizing and splitting, CJK characters one by one, [CLS] A [SEP] when special
    tokens are asked for), with the special tokens the vocabulary has."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS if t in vocab])
    has = {t: (t if t in vocab else None) for t in BERT_SPECIALS}
    return FastTokenizer(
        tok, pad_token=has["[PAD]"], sep_token=has["[SEP]"], unk_token=has["[UNK]"], cls_token=has["[CLS]"], mask_token=has["[MASK]"]
    )


def load_wordpiece(path: Path) -> FastTokenizer | None:
    """A model directory's BERT vocabulary (vocab.txt, as the Chinese GPT-2 models ship it) when it
    has no tokenizer.json, else None; tokenizer_config.json says whether it lowercases."""
    file = path / "vocab.txt"
    if (path / "tokenizer.json").is_file() or not file.is_file():
        return None
    config = _json_object(path / "tokenizer_config.json")
    if config.get("tokenizer_class") not in (None, "BertTokenizer", "BertTokenizerFast"):
        return None
    try:
        words = file.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelUnavailableError(f"{file}: cannot read the vocabulary ({exc})") from None
    vocab: dict[str, int] = {}
    for word in (w.rstrip("\r") for w in words):
        if word and word not in vocab:
            vocab[word] = len(vocab)
    if "[UNK]" not in vocab:
        raise ModelUnavailableError(f"{file}: the vocabulary has no [UNK] token")
    accents = config.get("strip_accents")
    return bert_wordpiece(vocab, bool(config.get("do_lower_case", True)), accents if isinstance(accents, bool) else None)


def _json_object(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        config = jsondata.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{file}: not a readable JSON file ({jsondata.reason(exc)})") from None
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{file}: not a JSON object")
    return config


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_fast(path: Path) -> FastTokenizer | None:
    """The fast tokenizer of a directory's tokenizer.json: byte-level BPE (GPT-2) or a BERT
    WordPiece vocabulary (a Chinese GPT-2 saved by transformers, as `aigc finetune` saves one);
    else None."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer, models

    try:  # parsed once, in Rust (reading it with json first cost 0.15 s of every start)
        tok = Tokenizer.from_file(str(file))
    except Exception:  # tokenizers raises plain Exception for a file it cannot read
        return None
    if isinstance(tok.model, models.WordPiece):
        bert = _json_object(path / "tokenizer_config.json").get("tokenizer_class") in (None, "BertTokenizer", "BertTokenizerFast")
        return FastTokenizer.from_dir(path, tok) if bert else None
    if not isinstance(tok.model, models.BPE):
        return None
    return FastTokenizer.from_dir(path, tok)
