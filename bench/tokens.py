"""Benchmark `aigc score --tokens` against plain `aigc score` on GPT-2-small's shape (random weights,
the real GPT-2 tokenizer), in one run, and `aigc stats`' measures (self-BLEU over 500 texts,
distinct-n and the rest over many texts). Prints the figures and the machine.

    .venv/bin/python bench/tokens.py [--rounds 3] [--chars 12000]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def machine() -> str:
    model, flags = platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            if key.strip() == "flags":
                flags = [f for f in value.split() if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")]
                break
    except OSError:
        pass
    import os

    return f"{model}, {os.cpu_count()} cores visible, flags: {' '.join(flags) or 'none of avx/avx2/fma/avx512'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=12000)
    args = parser.parse_args()
    import torch

    from aigc_cli.apps.textstats import Stats, self_bleu
    from aigc_cli.apps.tokenview import token_records
    from aigc_cli.core.modelspec import ModelSpec
    from aigc_cli.engine.engine import Engine
    from aigc_cli.engine.scoring import score_texts
    from make_model import build

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    engine = Engine.load(ModelSpec.parse(str(build()), "cpu", "float32", "none"))
    # text by people: this repository's documentation
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((HERE.parent / "docs").glob("*.md")))[: args.chars]
    tokens = len(engine.tokenizer.encode(text))
    print(f"text: {len(text)} characters, {tokens} tokens, context {engine.context_length}, default stride")
    times: dict[str, list[float]] = {"score": [], "score --tokens --top 5": [], "score --tokens --top 0": []}
    for r in range(args.rounds):
        cases = list(times)
        cases = cases[r % len(cases) :] + cases[: r % len(cases)]  # the order rotates every round
        for case in cases:
            start = time.perf_counter()
            if case == "score":
                rows = score_texts(engine, [(0, text)], None, 8)
            else:
                rows = token_records(engine, [(0, text)], 5 if "5" in case else 0, None, 8)
            times[case].append(time.perf_counter() - start)
            assert "error" not in rows[0]
    base = statistics.median(times["score"])
    print("\n| case | median s | min s | tokens/s (median) | vs score |\n|---|---:|---:|---:|---:|")
    for case, ts in times.items():
        m = statistics.median(ts)
        print(f"| `{case}` | {m:.2f} | {min(ts):.2f} | {tokens / m:,.0f} | {m / base:.2f}x |")

    rng = random.Random(0)
    words = text.split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(20, 60))) for _ in range(20000)]
    start = time.perf_counter()
    stats = Stats("auto", 500, 0)
    for t in texts:
        stats.overall.add(*_units(t))
    streamed = time.perf_counter() - start
    print(f"\naigc stats: distinct-n, rep-n, lengths and the sample over {len(texts):,} texts of 20-60 words: {streamed:.2f} s "
          f"({len(texts) / streamed:,.0f} texts/s)")
    print("\n| self-BLEU (n = 2, 3, 4) | texts | seconds |\n|---|---:|---:|")
    for n in (200, 500):
        start = time.perf_counter()
        ours = self_bleu([t.split() for t in texts[:n]])
        print(f"| aigc (two largest counts per n-gram) | {n} | {time.perf_counter() - start:.2f} |")
    start = time.perf_counter()
    direct = _nltk_self_bleu([t.split() for t in texts[:200]])
    print(f"| nltk's sentence_bleu per text (Texygen's loop) | 200 | {time.perf_counter() - start:.2f} |")
    assert ours is not None and max(abs(a - b) for a, b in zip(self_bleu([t.split() for t in texts[:200]]) or [], direct)) < 1e-12


def _nltk_self_bleu(texts: list[list[str]]) -> list[float]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    weights = [(1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]
    sums = [0.0, 0.0, 0.0]
    for i, hyp in enumerate(texts):
        got = sentence_bleu(texts[:i] + texts[i + 1 :], hyp, weights, smoothing_function=SmoothingFunction().method1)
        sums = [a + b for a, b in zip(sums, got if isinstance(got, list) else [got] * 3)]
    return [x / len(texts) for x in sums]


def _units(text: str) -> tuple[str, list[str]]:
    from aigc_cli.apps.textstats import units

    return units(text, "auto")


if __name__ == "__main__":
    main()
