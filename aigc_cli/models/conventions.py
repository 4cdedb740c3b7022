"""How a model frames text, read from the model itself and never left as None: the token a text
starts with, the one that ends it (generation stops there), the padding, and the prefix every
prompt gets.

GPT-2's byte-level vocabulary: <|endoftext|> starts (for scoring: the first token is conditioned
on it), ends and pads a text, and prompts get no prefix. A BERT-vocabulary GPT-2 (the UER Chinese
models, `tiny-random-zh`): [CLS] starts every text, as these models were trained, [SEP] ends it and
[PAD] pads. Ids in config.json or generation_config.json that lie outside the vocabulary (the UER
configs carry GPT-2's 50256 in a vocabulary of 21,128) are never used; the decision and its reasons
are kept to be shown by `aigc info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import ModelUnavailableError


@dataclass(frozen=True)
class Conventions:
    start: str | None
    start_id: int | None
    end: str | None
    end_id: int | None
    pad: str | None
    pad_id: int | None
    prefix: tuple[int, ...]  # put before every prompt's tokens
    why: tuple[str, ...]  # how each was decided, for `aigc info`
    source: str  # where the tokenizer's files are (named in errors)

    def need(self, role: str, purpose: str) -> int:
        """The id of the "start", "end" or "pad" token; ModelUnavailableError (exit 3) naming the
        token and the files when the model defines none."""
        value = {"start": self.start_id, "end": self.end_id, "pad": self.pad_id}[role]
        if value is None:
            wanted = {"start": "a start (bos or [CLS])", "end": "an end-of-text (eos or [SEP])", "pad": "a padding ([PAD] or eos)"}[role]
            raise ModelUnavailableError(f"{self.source}: the tokenizer defines no {wanted} token, which {purpose} needs")
        return value


def settle(tokenizer: Any, directory: Path | None, source: str) -> Conventions:
    """Decide the model's start, end and pad tokens from its tokenizer, set them on the tokenizer
    (so that every part of aigc reads the same ones), and say why."""
    size = len(tokenizer)
    why = _config_ids_outside(directory, size)
    cls, sep, eos = (getattr(tokenizer, f"{n}_token", None) for n in ("cls", "sep", "eos"))
    bert = bool(cls and sep and (not eos or eos == sep))  # (eos == sep: settled before)
    if bert:
        tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
        why.append(f"a BERT vocabulary without bos or eos: texts start with {tokenizer.cls_token} and end with {tokenizer.sep_token}")
    elif getattr(tokenizer, "bos_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.bos_token = tokenizer.eos_token
        why.append(f"no bos token: texts start with the end-of-text token {tokenizer.eos_token}, as GPT-2 was trained")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
        why.append(f"no pad token: {tokenizer.eos_token} pads")
    start, end, pad = (_checked(tokenizer, name, size) for name in ("bos_token", "eos_token", "pad_token"))
    prefix = (start[1],) if bert and start[1] is not None else ()
    return Conventions(start[0], start[1], end[0], end[1], pad[0], pad[1], prefix, tuple(why), source)


def _checked(tokenizer: Any, name: str, size: int) -> tuple[str | None, int | None]:
    token = getattr(tokenizer, name, None)
    token_id = getattr(tokenizer, f"{name}_id", None) if token else None
    if token_id is None or not 0 <= token_id < size:
        return None, None
    return token, token_id


def _config_ids_outside(directory: Path | None, size: int) -> list[str]:
    """Notes on the special-token ids of config.json and generation_config.json that lie outside the
    vocabulary: they are not used."""
    notes: list[str] = []
    if directory is None:
        return notes
    for name in ("config.json", "generation_config.json"):
        file = directory / name
        try:
            config = jsondata.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError):
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = config.get(key) if isinstance(config, dict) else None
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, int) and not 0 <= v < size:
                    notes.append(f"{name}'s {key} {v} is outside the vocabulary of {size}: not used")
    return notes


def document_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a training document is framed with once `settle` decided the tokenizer's tokens:
    ([CLS], [SEP]) for a BERT vocabulary, as its models were trained; (nothing, end-of-text) for
    GPT-2, as transformers' run_clm packs documents."""
    cls, sep, eos = (getattr(tokenizer, f"{n}_token", None) for n in ("cls", "sep", "eos"))
    if cls and sep and eos == sep:
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    return [], [tokenizer.eos_token_id]
