"""Does a sampled record depend on anything but its prompt, settings and seed? The same 48 records
(24 prompts x -n 2, top-p 0.9, top-k off: a nucleus of tens of thousands of near-equal tokens on
random weights) generated with batch size 1, 16 and auto, as two merged shards, and in two other
arrival orders; counts the records that differ from the batch-size-1 run. Writes
bench/RESULTS-invariance.md.

    .venv/bin/python bench/invariance.py
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import torch

    from batch import make_prompts
    from make_model import build
    from run import _cpu

    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.core.settings import GenerationSettings

    engine = Engine.load(str(build()))
    prompts = make_prompts(24)

    def run(reqs: list[Request], batch: int | None) -> dict[tuple[int, int], list[int]]:
        return {(c.id, c.index): c.token_ids for c in engine.generate(reqs, batch_size=batch)}

    table: dict[str, list[str]] = {}
    for label, top_p in (("top-p 0.9", 0.9), ("top-p 1 (plain)", 1.0)):
        settings = GenerationSettings(num_sequences=2, max_new_tokens=32, top_k=0, top_p=top_p, seed=7).resolved()
        requests = [Request(i, p, settings, 7) for i, p in enumerate(prompts)]
        reference = run(requests, 1)
        cases = {"batch size 16": run(requests, 16), "batch size auto": run(requests, None)}
        cases["two shards, merged"] = {**run(requests[0::2], None), **run(requests[1::2], None)}
        for seed in (1, 2):
            shuffled = requests[:]
            random.Random(seed).shuffle(shuffled)
            cases[f"arrival order shuffled ({seed})"] = run(shuffled, None)
        for name, got in cases.items():
            differ = sum(got[k] != v for k, v in reference.items())
            table.setdefault(name, []).append(f"{differ} of {len(reference)}")
            print(f"{label}, {name}: {differ} of {len(reference)} records differ from batch size 1", flush=True)
    rows = [f"| {name} | {' | '.join(cells)} |" for name, cells in table.items()]
    lines = [
        "# Sampling invariance",
        "",
        f"Run on {datetime.date.today().isoformat()}: {_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        "GPT-2-small shape, random weights, real tokenizer; 24 prompts x -n 2, 32 new tokens, "
        "`--top-k 0 --seed 7`; top-p 0.9 (a nucleus of tens of thousands of near-equal tokens) and top-p 1 "
        "(plain sampling from the whole vocabulary, raced in two stages).",
        "",
        "| compared with batch size 1 | records that differ, top-p 0.9 | top-p 1 |",
        "|---|---|---|",
        *rows,
        "",
        "Before the Gumbel race (inverse-CDF draws, 2026-11-29 build), the issue measured 21 of 48 "
        "records differing between batch size 1 and auto on such a file.",
        "",
        "Rerun: `.venv/bin/python bench/invariance.py`.",
        "",
    ]
    (HERE / "RESULTS-invariance.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
