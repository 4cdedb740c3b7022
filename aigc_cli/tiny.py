"""The built-in `tiny-random` model: a deterministic, tiny GPT-2 with a byte-level tokenizer, built in-process.

Its weights are random, so its output is gibberish by design; it exists for smoke tests of pipelines.
"""

from __future__ import annotations

from typing import Any

TINY_MODEL_ID = "tiny-random"
_SEED = 20261123


def byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-printable-char mapping as a 256-entry vocabulary, plus <|endoftext|> (id 256)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    return vocab


def build_tiny(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 1024) -> tuple[Any, Any]:
    """(model, tokenizer) for the built-in tiny-random model; same weights on every call."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tokenizer = GPT2Tokenizer(vocab=byte_vocab(), merges=[])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
            # ... and a bias through ln_f towards printable ASCII and newline, so the gibberish
            # is mostly printable (random bytes would be mostly invalid UTF-8 and control codes).
            printable = torch.zeros(head.shape[0], dtype=torch.bool)
            printable[32:127] = True
            printable[10] = True
            head[:, 0] = torch.where(printable, 1.0, -1.0)
            model.transformer.ln_f.bias[0] = 3.0
    model.eval()
    return model, tokenizer
