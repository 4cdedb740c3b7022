"""A model directory's tokenizer.json through the `tokenizers` library directly: the small part of the
transformers tokenizer API that aigc uses, without importing transformers at start-up."""

from __future__ import annotations

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
    ) -> None:
        self._tok = tok
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.sep_token = sep_token
        self.unk_token = unk_token

    @classmethod
    def from_dir(cls, path: Path, tok: Any = None) -> FastTokenizer:
        """A model directory's tokenizer.json (or `tok`, already read from it), with the special
        tokens its tokenizer_config.json names."""
        if tok is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        file = path / "tokenizer_config.json"
        if file.is_file():
            try:
                config = jsondata.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelUnavailableError(f"{file}: not a readable JSON file ({jsondata.reason(exc)})") from None
            if not isinstance(config, dict):
                raise ModelUnavailableError(f"{file}: not a JSON object")
        special = {k: _content(config.get(k)) for k in ("eos_token", "bos_token", "pad_token", "sep_token", "unk_token")}
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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, clean_up_tokenization_spaces: bool = False, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, clean_up_tokenization_spaces: bool = False, skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_fast(path: Path) -> FastTokenizer | None:
    """The fast tokenizer for a GPT-2-style directory (byte-level BPE in tokenizer.json), else None."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer, models

    try:  # parsed once, in Rust (reading it with json first cost 0.15 s of every start)
        tok = Tokenizer.from_file(str(file))
    except Exception:  # tokenizers raises plain Exception for a file it cannot read
        return None
    if not isinstance(tok.model, models.BPE):
        return None
    return FastTokenizer.from_dir(path, tok)
