"""Batch benchmark: a 1,000-prompt file through one `aigc generate -f` process, versus (a) one
`aigc generate` process per prompt and (b) a plain transformers loop calling `generate` per prompt
on the same model and settings; writes bench/RESULTS-batch.md.

    .venv/bin/python bench/batch.py                     # 1,000 prompts
    .venv/bin/python bench/batch.py --prompts 200       # quicker
    .venv/bin/python bench/batch.py --mixed 512         # records of mixed lengths (its own section)
    .venv/bin/python bench/batch.py --contrastive 32    # contrastive search, scheduler vs static (its own section)

Every case samples (top-k 50) exactly --new-tokens tokens per prompt. (a) and (b) are rates, so
they are measured on the first --per-process and --reference prompts and reported as tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you were "
    "her all she there would their we him been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each"
).split()


def make_prompts(n: int) -> list[str]:
    """Deterministic prompts of 3 to 40 words."""
    return [" ".join(WORDS[(i * 13 + j * 7) % len(WORDS)] for j in range(3 + (i * 17) % 38)).capitalize() for i in range(n)]


def mixed(args: argparse.Namespace, path: str) -> list[str]:
    """Records whose settings differ: max_new_tokens spread over 8..160, a quarter with a stop
    string that ends them early; greedy. The same records through the continuous-batching
    scheduler and through static batching (rows of any settings in one batch, no refill), then a
    uniform file with the same total of tokens through the scheduler and through the engine as it
    was before the scheduler (static batches of identical settings, sorted by prompt length)."""
    import torch

    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.core.settings import GenerationSettings

    engine = Engine.load(path)
    base = GenerationSettings(decoding="greedy").resolved()
    prompts = make_prompts(args.mixed)
    records = [
        Request(i, p, base.with_overrides(max_new_tokens=8 + (i * 97) % 153, stop=("k",) if i % 4 == 0 else ()), 1)
        for i, p in enumerate(prompts)
    ]
    batch = None if args.batch_size == "auto" else int(args.batch_size)
    list(engine.generate(records[:8], batch_size=batch))  # warm-up

    def timed(requests: list, batching: str) -> tuple[float, int]:
        started = time.perf_counter()
        tokens = sum(c.completion_tokens for c in engine.generate(requests, batch_size=batch, batching=batching))
        return time.perf_counter() - started, tokens

    # The uniform file's share of tokens per record comes from the mixed file's total (greedy: the
    # same every round). The four cases run in turn, --rounds times, and each reports its best
    # round: this VM drifts by 5-10% over minutes, and interleaving spreads that over every case.
    total = per = uni_total = 0
    times: dict[str, list[float]] = {"mixed": [], "static": [], "uniform": [], "grouped": []}
    uniform: list = []
    for round_ in range(1, args.rounds + 1):
        mixed_s, total = timed(records, "continuous")
        times["mixed"].append(mixed_s)
        print(f"round {round_}: mixed, continuous: {mixed_s:.1f} s, {total} tokens, {total / mixed_s:.1f} tok/s", flush=True)
        static_s, static_total = timed(records, "static")
        assert static_total == total, (static_total, total)
        times["static"].append(static_s)
        print(f"round {round_}: mixed, static batches: {static_s:.1f} s, {total / static_s:.1f} tok/s", flush=True)
        if not uniform:
            per = round(total / len(records))
            uniform = [Request(i, p, base.with_overrides(max_new_tokens=per), 1) for i, p in enumerate(prompts)]
        uni_s, uni_total = timed(uniform, "continuous")
        times["uniform"].append(uni_s)
        print(f"round {round_}: uniform ({per} tokens each), continuous: {uni_s:.1f} s, {uni_total / uni_s:.1f} tok/s", flush=True)
        old_s, _ = timed(uniform, "grouped")
        times["grouped"].append(old_s)
        print(f"round {round_}: uniform, grouped (before): {old_s:.1f} s, {uni_total / old_s:.1f} tok/s", flush=True)
    mixed_s, static_s, uni_s, old_s = (min(times[k]) for k in ("mixed", "static", "uniform", "grouped"))
    rounds = "; ".join(
        f"round {i + 1}: " + " / ".join(f"{(total if k in ('mixed', 'static') else uni_total) / times[k][i]:.0f}" for k in times)
        for i in range(args.rounds)
    )
    rows = [
        f"| mixed: `max_new_tokens` 8..160, a quarter with a stop string | continuous batching (default) | {mixed_s:.1f} s | {total / mixed_s:.1f} |",
        f"| the same file | static batches (rows of any settings together, no refill) | {static_s:.1f} s | {total / static_s:.1f} |",
        f"| uniform: {per} tokens each (same total) | continuous batching (default) | {uni_s:.1f} s | {uni_total / uni_s:.1f} |",
        f"| the same file | grouped static batches (the engine before the scheduler) | {old_s:.1f} s | {uni_total / old_s:.1f} |",
    ]
    ratios = (
        f"Mixed / uniform: {total / mixed_s / (uni_total / uni_s):.2f}x (target >= 0.9). "
        f"Mixed, continuous / static: {static_s / mixed_s:.2f}x (target >= 1.3). "
        f"Uniform, continuous / before: {old_s / uni_s:.2f}x (target >= 0.95). "
        f"Bound on continuous / static for this file: static / uniform = {static_s / uni_s:.2f}x "
        "(the uniform file, same tokens with every slot busy and shorter contexts, is as fast as the mixed one can get)."
    )
    print(ratios)
    print(rounds)
    machine = f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return [
        "## Mixed lengths: continuous batching",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}. GPT-2-small shape, random weights, real tokenizer; "
        f"{len(records)} records of 3-40 words, greedy, one process, batch size {args.batch_size}; "
        f"{total} tokens in the mixed file, {uni_total} in the uniform one. The four cases ran in turn, "
        f"{args.rounds} rounds; each row is the case's best round.",
        "",
        "| file | batching | time | tokens/s |",
        "|---|---|---|---|",
        *rows,
        "",
        ratios,
        "",
        f"Every round, tok/s (mixed continuous / mixed static / uniform continuous / grouped): {rounds}.",
        "",
        "Rerun: `.venv/bin/python bench/batch.py --mixed 512` (`--rounds 2` by default).",
        "",
    ]


def contrastive(args: argparse.Namespace, path: str) -> list[str]:
    """Contrastive search (top-k 4, alpha 0.6, 48 new tokens) on the scheduler, where each row holds
    one slot per candidate and shares the batch, against the static loop of the engine before it."""
    import torch

    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.core.settings import GenerationSettings

    engine = Engine.load(path)
    settings = GenerationSettings(decoding="contrastive", max_new_tokens=48, min_new_tokens=48).resolved()
    records = [Request(i, p, settings, 1) for i, p in enumerate(make_prompts(args.contrastive))]
    batch = None if args.batch_size == "auto" else int(args.batch_size)
    list(engine.generate(records[:4], batch_size=batch))  # warm-up
    rows, texts = [], {}
    for batching, label in (("continuous", "scheduler (default)"), ("grouped", "static batches (the engine before)")):
        started = time.perf_counter()
        done = list(engine.generate(records, batch_size=batch, batching=batching))
        took = time.perf_counter() - started
        tokens = sum(c.completion_tokens for c in done)
        texts[batching] = [c.text for c in done]
        print(f"contrastive, {label}: {took:.1f} s, {tokens / took:.1f} tok/s", flush=True)
        rows.append(f"| {label} | {took:.1f} s | {tokens / took:.1f} |")
    same = sum(a == b for a, b in zip(texts["continuous"], texts["grouped"]))
    machine = f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return [
        "## Contrastive search",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}. GPT-2-small shape, random weights, real tokenizer; "
        f"{len(records)} prompts of 3-40 words, top-k 4, alpha 0.6, 48 new tokens each, batch size {args.batch_size}.",
        "",
        "| batching | time | tokens/s |",
        "|---|---|---|",
        *rows,
        "",
        f"Identical texts: {same} of {len(records)}.",
        "",
        f"Rerun: `.venv/bin/python bench/batch.py --contrastive {args.contrastive}`.",
        "",
    ]


def _write_section(out: Path, section: list[str]) -> None:
    """Replace the section with this title (up to the next `## `), or append it."""
    old = out.read_text() if out.exists() else ""
    title = section[0]
    parts = old.split("\n## ")
    kept = [p if i == 0 else "## " + p for i, p in enumerate(parts)]
    new = "\n".join(section).rstrip("\n") + "\n"
    for i, part in enumerate(kept):
        if part.startswith(title + "\n"):
            kept[i] = new
            break
    else:
        kept.append(new)
    out.write_text("\n".join(p.rstrip("\n") + "\n" for p in kept))


def _cpu_name() -> str:
    from run import _cpu

    return _cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed", type=int, default=0, help="run only the mixed-length case with this many records")
    parser.add_argument("--contrastive", type=int, default=0, help="run only the contrastive-search case with this many prompts")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--per-process", type=int, default=8, help="prompts timed for (a)")
    parser.add_argument("--reference", type=int, default=64, help="prompts timed for (b)")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="--mixed: run the four cases in turn this many times, report each one's best")
    parser.add_argument("--out", default=str(HERE / "RESULTS-batch.md"))
    args = parser.parse_args()

    from make_model import build

    from run import _cpu

    path = str(build())
    if args.mixed or args.contrastive:
        out = Path(args.out)
        _write_section(out, mixed(args, path) if args.mixed else contrastive(args, path))
        print(f"wrote {out}")
        return
    exe = str(Path(sys.executable).with_name("aigc"))
    prompts = make_prompts(args.prompts)
    n_new = args.new_tokens
    common = ["--model", path, "--max-new-tokens", str(n_new), "--min-new-tokens", str(n_new), "--seed", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "prompts.txt"
        file.write_text("\n".join(prompts) + "\n")
        out = Path(tmp) / "out.jsonl"
        started = time.perf_counter()
        subprocess.run([exe, "generate", "-f", str(file), "-o", str(out), "--batch-size", args.batch_size, *common], check=True)
        batch_s = time.perf_counter() - started
        assert sum(1 for _ in out.open()) == len(prompts)
    batch_rate = len(prompts) * n_new / batch_s
    print(f"aigc -f, {len(prompts)} prompts: {batch_s:.1f} s, {batch_rate:.1f} tok/s", flush=True)

    started = time.perf_counter()
    for p in prompts[: args.per_process]:
        subprocess.run([exe, "generate", p, "--format", "jsonl", *common], check=True, capture_output=True)
    per_process_s = (time.perf_counter() - started) / args.per_process
    per_process_rate = n_new / per_process_s
    print(f"(a) one aigc process per prompt: {per_process_s:.2f} s per prompt, {per_process_rate:.1f} tok/s", flush=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts[: args.reference]:
            ids = tok(p, return_tensors="pt")
            model.generate(**ids, do_sample=True, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.eos_token_id)
    ref_s = (time.perf_counter() - started) / args.reference
    ref_rate = n_new / ref_s
    print(f"(b) transformers generate per prompt (model loaded once): {ref_s:.2f} s per prompt, {ref_rate:.1f} tok/s")

    machine = f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        "# Batch benchmark",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}. GPT-2-small shape, random weights, real tokenizer.",
        f"{len(prompts)} prompts of 3-40 words, sampling (top-k 50), exactly {n_new} new tokens each.",
        "",
        "| how | time | tokens/s | aigc -f is faster by |",
        "|---|---|---|---|",
        f"| `aigc generate -f prompts.txt -o out.jsonl` (batch size {args.batch_size}) | {batch_s:.1f} s for {len(prompts)} prompts | {batch_rate:.1f} | - |",
        f"| (a) one `aigc generate` process per prompt (first {args.per_process}) | {per_process_s:.2f} s per prompt | {per_process_rate:.1f} | {batch_rate / per_process_rate:.1f}x |",
        f"| (b) transformers `generate` per prompt, model loaded once (first {args.reference}) | {ref_s:.2f} s per prompt | {ref_rate:.1f} | {batch_rate / ref_rate:.1f}x |",
        "",
        "Rerun: `.venv/bin/python bench/batch.py`.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
