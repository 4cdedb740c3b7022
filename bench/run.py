"""Benchmark aigc against the transformers reference in one run; writes bench/RESULTS.md.

    .venv/bin/python bench/run.py            # every case, 3 repeats
    .venv/bin/python bench/run.py --repeat 1 # quicker

The model has GPT-2-small's exact shape with random weights (bench/make_model.py), so speed and
memory are those of `gpt2`; every case forces exactly N new tokens (min = max new tokens). The
reference is transformers' `generate` on the same weights and settings. The exact mode's greedy and
beam outputs are asserted equal to the reference's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PROMPT = "Hello, how are you?"
FAST_MODES = ("int8", "fp16")
CASE_PROMPTS = [
    "The history of the city begins",
    "In a quiet village by the sea, an old fisherman",
    "Scientists announced today that",
    "My favourite recipe for a rainy day is",
]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _process(cmd: list[str], repeat: int) -> tuple[list[float], int]:
    """Wall times of a whole process, and its peak RSS in KiB (GNU time)."""
    times, peak = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr}")
        peak = max(peak, int(done.stderr.strip().splitlines()[-1]))
    return times, peak


REFERENCE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, n, tokens, sample = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("Hello, how are you?", return_tensors="pt")
torch.manual_seed(0)
out = model.generate(**ids, do_sample=sample, num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tok.eos_token_id)
for seq in out:
    print(tok.decode(seq))
"""


CT2_SCRIPT = """
import sys, ctranslate2, tokenizers
model, hf_dir, compute = sys.argv[1], sys.argv[2], sys.argv[3]
tok = tokenizers.Tokenizer.from_file(hf_dir + "/tokenizer.json")
gen = ctranslate2.Generator(model, device="cpu", compute_type=compute, intra_threads=2)
tokens = tok.encode("Hello, how are you?").tokens
out = gen.generate_batch([tokens], num_hypotheses=5, sampling_topk=50, max_length=44, min_length=44, include_prompt_in_result=False)
for seq in out[0].sequences_ids:
    print(tok.decode(seq))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    from make_model import build

    path = str(build())
    import torch
    import transformers

    from aigc_cli.engine import Engine, Request
    from aigc_cli.settings import Decoding
    from aigc_cli.settings import GenerationSettings as S

    exe = str(Path(sys.executable).with_name("aigc"))
    rows: list[tuple[str, str, str, str, str]] = []

    def report(case: str, ours: list[float], ref: list[float] | None, unit: str, work: float = 1.0, target: str = "") -> None:
        if unit == "tok/s":
            o, r = work / statistics.median(ours), (work / statistics.median(ref) if ref else None)
            o_best = work / min(ours)
            text_o = f"{o:.1f} (best {o_best:.1f})"
            ratio = f"{o / r:.2f}x" if r else "-"
            text_r = f"{r:.1f}" if r else "-"
        else:
            o, r = statistics.median(ours), (statistics.median(ref) if ref else None)
            text_o = f"{o:.2f} s (min {min(ours):.2f})"
            text_r = f"{r:.2f} s" if r else "-"
            ratio = f"{r / o:.2f}x faster" if r else "-"
        rows.append((case, text_o, text_r, ratio, target))
        print(f"{case:55s} aigc {text_o:22s} transformers {text_r:10s} {ratio}", flush=True)

    # 1. aigc --help and whole processes
    help_times, _ = _process([exe, "--help"], args.repeat)
    report("aigc --help (whole process)", help_times, None, "s", target="< 0.3 s")
    cli = [exe, "generate", PROMPT, "--model", path, "--seed", "1", "--format", "jsonl"]
    ours, peak_ours = _process([*cli, "--decoding", "greedy", "--max-new-tokens", "44", "--min-new-tokens", "44"], args.repeat)
    ref, peak_ref = _process([sys.executable, "-c", REFERENCE_SCRIPT, path, "1", "44", "0"], args.repeat)
    report("whole process: 1 prompt, 44 greedy tokens, exit", ours, ref, "s")
    readme = [*cli, "-n", "5", "--max-new-tokens", "44", "--min-new-tokens", "44"]
    ours, _ = _process(readme, args.repeat)
    ref, _ = _process([sys.executable, "-c", REFERENCE_SCRIPT, path, "5", "44", "1"], args.repeat)
    report("whole process: n=5 x 44 sampling (the README example)", ours, ref, "s", target="2.0 s")
    rows.append(("peak memory, one prompt (whole process)", f"{peak_ours / 1024:.0f} MiB", f"{peak_ref / 1024:.0f} MiB", "-", ""))
    print(f"peak memory: aigc {peak_ours / 1024:.0f} MiB, transformers {peak_ref / 1024:.0f} MiB")
    from aigc_cli.quantize import int8_cache_dir

    shutil.rmtree(int8_cache_dir(), ignore_errors=True)  # the first int8 run quantizes and fills the cache
    first, _ = _process([*readme, "--quantize", "int8"], 1)
    report("whole process: README example, --quantize int8, first run (quantizes, fills the cache)", first, ref, "s")
    for mode in FAST_MODES:
        ours, peak_fast = _process([*readme, "--quantize", mode], args.repeat)
        report(f"whole process: README example, --quantize {mode}", ours, ref, "s", target="2.0 s")
        rows.append((f"peak memory, one prompt, --quantize {mode}", f"{peak_fast / 1024:.0f} MiB", f"{peak_ref / 1024:.0f} MiB", "-", "300 MiB"))
        print(f"peak memory --quantize {mode}: {peak_fast / 1024:.0f} MiB")

    # 2. in-process throughput on the same weights
    engine = Engine.load(path)
    from transformers import AutoTokenizer

    model = engine.lm.hf_model  # transformers' model with the same weights: the reference
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)

    def ours_run(prompts: list[str], settings: S) -> list:
        reqs = [Request(i, p, settings, 1) for i, p in enumerate(prompts)]
        return list(engine.generate(reqs, batch_size=64))

    def ref_run(prompts: list[str], **kw) -> torch.Tensor:
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            return model.generate(**batch, pad_token_id=tok.eos_token_id, **kw)

    greedy = S(decoding=Decoding.greedy, max_new_tokens=128, min_new_tokens=128).resolved()
    ours_out = ours_run([PROMPT], greedy)
    ref_out = ref_run([PROMPT], do_sample=False, max_new_tokens=128, min_new_tokens=128)
    n_prompt = len(tok.encode(PROMPT))
    assert ours_out[0].token_ids == ref_out[0, n_prompt:].tolist(), "greedy output differs from transformers"
    ref_greedy = _timed(lambda: ref_run([PROMPT], do_sample=False, max_new_tokens=128, min_new_tokens=128), args.repeat)
    report("batch-1 greedy, 128 new tokens", _timed(lambda: ours_run([PROMPT], greedy), args.repeat), ref_greedy, "tok/s", 128, ">= 40")
    beam = S(decoding=Decoding.beam, num_beams=5, max_new_tokens=64, min_new_tokens=64).resolved()
    ours_out = ours_run([PROMPT], beam)
    ref_out = ref_run([PROMPT], do_sample=False, num_beams=5, max_new_tokens=64, min_new_tokens=64)
    assert ours_out[0].token_ids == ref_out[0, n_prompt:].tolist(), "beam output differs from transformers"
    ref_beam = _timed(lambda: ref_run([PROMPT], do_sample=False, num_beams=5, max_new_tokens=64, min_new_tokens=64), args.repeat)
    report("beam search, 5 beams, 64 new tokens", _timed(lambda: ours_run([PROMPT], beam), args.repeat), ref_beam, "tok/s", 64, ">= 20")
    prompts32 = [CASE_PROMPTS[i % 4] for i in range(32)]
    sample = S(max_new_tokens=64, min_new_tokens=64, top_p=0.9).resolved()
    ref_batch = _timed(lambda: ref_run(prompts32, do_sample=True, top_p=0.9, max_new_tokens=64, min_new_tokens=64), args.repeat)
    report("32 prompts x 64 new, sampling top-p 0.9", _timed(lambda: ours_run(prompts32, sample), args.repeat), ref_batch, "tok/s", 32 * 64, ">= 250")

    # 3. fast modes, against the same float32 reference
    for mode in FAST_MODES:
        engine = Engine.load(path, quantize=mode)
        ours_run(prompts32[:2], sample)  # warm-up
        report(f"batch-1 greedy, 128 new, --quantize {mode}", _timed(lambda: ours_run([PROMPT], greedy), args.repeat), ref_greedy, "tok/s", 128, ">= 100")
        report(f"beam search, 5 beams, 64 new, --quantize {mode}", _timed(lambda: ours_run([PROMPT], beam), args.repeat), ref_beam, "tok/s", 64)
        report(f"32 prompts x 64 new, top-p 0.9, --quantize {mode}", _timed(lambda: ours_run(prompts32, sample), args.repeat), ref_batch, "tok/s", 32 * 64, ">= 450")

    # 4. CTranslate2, when it is installed (pip install ctranslate2): the same cases, same weights
    ct2_note = "CTranslate2: not installed, not measured."
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    if ctranslate2 is not None:
        ct2_dir = HERE / "_model" / "ct2-float32"
        if not (ct2_dir / "model.bin").exists():
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(path).convert(str(ct2_dir), force=True)
        ct2_note = f"CTranslate2 {ctranslate2.__version__}: the same weights converted with its TransformersConverter, intra_threads=2."
        for compute in ("float32", "int8"):
            ct2_times, _ = _process([sys.executable, "-c", CT2_SCRIPT, str(ct2_dir), path, compute], args.repeat)
            report(f"CTranslate2 {compute}: whole process, README example", ct2_times, ref, "s")
            gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute, intra_threads=2)

            def ct2_run(prompts: list[str], n: int, gen: Any = gen, **kw: Any) -> list:
                batch = [[tok.convert_ids_to_tokens(i) for i in tok.encode(p_)] for p_ in prompts]
                out = gen.generate_batch(batch, max_length=n, min_length=n, include_prompt_in_result=False, **kw)
                assert all(len(seq) == n for r in out for seq in r.sequences_ids)
                return out

            ct2_run([PROMPT], 128, sampling_topk=1)  # warm-up
            report(f"CTranslate2 {compute}: batch-1 greedy, 128 new", _timed(lambda: ct2_run([PROMPT], 128, sampling_topk=1), args.repeat), ref_greedy, "tok/s", 128)
            report(f"CTranslate2 {compute}: beam search, 5 beams, 64 new", _timed(lambda: ct2_run([PROMPT], 64, beam_size=5), args.repeat), ref_beam, "tok/s", 64)
            report(
                f"CTranslate2 {compute}: 32 prompts x 64 new, top-p 0.9",
                _timed(lambda: ct2_run(prompts32, 64, sampling_topk=50, sampling_topp=0.9), args.repeat),
                ref_batch,
                "tok/s",
                32 * 64,
            )

    machine = f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    lines = [
        "# Benchmark results",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}.",
        f"Model: GPT-2-small shape (124M parameters), random weights, {'real GPT-2 tokenizer' if len(tok) == 50257 else 'tiny tokenizer'};",
        f"every case forces exactly N new tokens; {args.repeat} repeats, medians (best in brackets).",
        "Reference: transformers `generate` on the same weights and settings, in the same run.",
        "Greedy and beam outputs were asserted token-identical to the reference.",
        "",
        ct2_note,
        "Fast modes (`--quantize`) are compared with the same float32 transformers reference; their quality",
        "cost is measured by bench/quality.py (bench/RESULTS-quality.md). Targets are issue 6's.",
        "",
        "| case | aigc | transformers | aigc vs transformers | target |",
        "|---|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows],
        "",
        "Rerun: `.venv/bin/python bench/run.py` (add `--repeat 1` for a quick look).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
