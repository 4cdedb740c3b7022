"""Build the benchmark model: GPT-2-small's exact shape (124M parameters) with random weights and the
real GPT-2 tokenizer from ../shared/gpt2-tokenizer when present (else the tiny byte-level one)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "gpt2-tokenizer"
TARGET = HERE / "_model" / "gpt2-small-random"


def build(target: Path = TARGET) -> Path:
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    if (SHARED / "vocab.json").exists():
        tok = GPT2TokenizerFast(vocab=str(SHARED / "vocab.json"), merges=str(SHARED / "merges.txt"))
        if len(tok) != 50257:  # transformers 5.x wants vocab=/merges= contents for the slow class
            tok = GPT2Tokenizer(vocab=str(SHARED / "vocab.json"), merges=str(SHARED / "merges.txt"))
    else:
        print("warning: ../shared/gpt2-tokenizer not found; using the tiny byte-level tokenizer", file=sys.stderr)
        from aigc_cli.models.tiny import build_tiny

        _, tok = build_tiny()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=max(len(tok), 50257))
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target


if __name__ == "__main__":
    print(build())
