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


def _rounds(contenders: dict[str, Any], repeat: int) -> dict[str, list[float]]:
    """Wall times of each contender, measured in alternating rounds (A B C, A B C, ...), so that
    this machine's drifting speed (up to 1.7x between runs) affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def _processes(commands: dict[str, list[str]], repeat: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Whole-process wall times in alternating rounds, and each command's peak RSS in KiB (GNU time)."""
    peaks = dict.fromkeys(commands, 0)

    def runner(name: str, cmd: list[str]) -> Any:
        def run() -> None:
            done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], check=False, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr}")
            peaks[name] = max(peaks[name], int(done.stderr.strip().splitlines()[-1]))

        return run

    return _rounds({name: runner(name, cmd) for name, cmd in commands.items()}, repeat), peaks


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

    # CTranslate2, when it is installed (pip install ctranslate2): the same weights, converted once
    ct2_note = "CTranslate2: not installed, not measured."
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    ct2_dir = HERE / "_model" / "ct2-float32"
    if ctranslate2 is not None:
        if not (ct2_dir / "model.bin").exists():
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(path).convert(str(ct2_dir), force=True)
        ct2_note = f"CTranslate2 {ctranslate2.__version__}: the same weights converted with its TransformersConverter, intra_threads=2."
    ct2_modes = ("float32", "int8") if ctranslate2 is not None else ()

    # 1. aigc --help and whole processes; each case's commands alternate round by round
    help_times, _ = _processes({"aigc": [exe, "--help"]}, args.repeat)
    report("aigc --help (whole process)", help_times["aigc"], None, "s", target="< 0.3 s")
    cli = [exe, "generate", PROMPT, "--model", path, "--seed", "1", "--format", "jsonl"]
    times, peaks = _processes(
        {
            "aigc": [*cli, "--decoding", "greedy", "--max-new-tokens", "44", "--min-new-tokens", "44"],
            "ref": [sys.executable, "-c", REFERENCE_SCRIPT, path, "1", "44", "0"],
        },
        args.repeat,
    )
    report("whole process: 1 prompt, 44 greedy tokens, exit", times["aigc"], times["ref"], "s")
    from aigc_cli.quantize import int8_cache_dir

    readme = [*cli, "-n", "5", "--max-new-tokens", "44", "--min-new-tokens", "44"]
    shutil.rmtree(int8_cache_dir(), ignore_errors=True)  # the first int8 run quantizes and fills the cache
    first, _ = _processes({"aigc": [*readme, "--quantize", "int8"]}, 1)
    commands = {"none": readme, **{mode: [*readme, "--quantize", mode] for mode in FAST_MODES}}
    commands["ref"] = [sys.executable, "-c", REFERENCE_SCRIPT, path, "5", "44", "1"]
    for compute in ct2_modes:
        commands[f"ct2-{compute}"] = [sys.executable, "-c", CT2_SCRIPT, str(ct2_dir), path, compute]
    times, peaks = _processes(commands, args.repeat)
    ref = times["ref"]
    report("whole process: n=5 x 44 sampling (the README example)", times["none"], ref, "s", target="2.0 s")
    rows.append(("peak memory, one prompt (whole process)", f"{peaks['none'] / 1024:.0f} MiB", f"{peaks['ref'] / 1024:.0f} MiB", "-", ""))
    report("whole process: README example, --quantize int8, first run (quantizes, fills the cache)", first["aigc"], ref, "s")
    for mode in FAST_MODES:
        report(f"whole process: README example, --quantize {mode}", times[mode], ref, "s", target="2.0 s")
        rows.append((f"peak memory, one prompt, --quantize {mode}", f"{peaks[mode] / 1024:.0f} MiB", f"{peaks['ref'] / 1024:.0f} MiB", "-", "300 MiB"))
    for compute in ct2_modes:
        report(f"CTranslate2 {compute}: whole process, README example", times[f"ct2-{compute}"], ref, "s")
        rows.append((f"peak memory, one prompt, CTranslate2 {compute}", f"{peaks[f'ct2-{compute}'] / 1024:.0f} MiB", f"{peaks['ref'] / 1024:.0f} MiB", "-", ""))

    # 2. in-process throughput on the same weights: every engine loaded, alternating round by round
    engines = {"none": Engine.load(path), **{mode: Engine.load(path, quantize=mode) for mode in FAST_MODES}}
    from transformers import AutoTokenizer

    model = engines["none"].lm.hf_model  # transformers' model with the same weights: the reference
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)

    def ours(mode: str, prompts: list[str], settings: S) -> Any:
        def run() -> list:
            reqs = [Request(i, p, settings, 1) for i, p in enumerate(prompts)]
            return list(engines[mode].generate(reqs, batch_size=64))

        return run

    def ref_run(prompts: list[str], **kw) -> torch.Tensor:
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            return model.generate(**batch, pad_token_id=tok.eos_token_id, **kw)

    generators = {c: ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=c, intra_threads=2) for c in ct2_modes}

    def ct2(compute: str, prompts: list[str], n: int, **kw: Any) -> Any:
        def run() -> list:
            batch = [[tok.convert_ids_to_tokens(i) for i in tok.encode(p_)] for p_ in prompts]
            out = generators[compute].generate_batch(batch, max_length=n, min_length=n, include_prompt_in_result=False, **kw)
            assert all(len(seq) == n for r in out for seq in r.sequences_ids)
            return out

        return run

    greedy = S(decoding=Decoding.greedy, max_new_tokens=128, min_new_tokens=128).resolved()
    beam = S(decoding=Decoding.beam, num_beams=5, max_new_tokens=64, min_new_tokens=64).resolved()
    prompts32 = [CASE_PROMPTS[i % 4] for i in range(32)]
    sample = S(max_new_tokens=64, min_new_tokens=64, top_p=0.9).resolved()
    n_prompt = len(tok.encode(PROMPT))
    for kw, settings in (({}, greedy), ({"num_beams": 5}, beam)):
        ours_out = ours("none", [PROMPT], settings)()
        ref_out = ref_run([PROMPT], do_sample=False, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.max_new_tokens, **kw)
        assert ours_out[0].token_ids == ref_out[0, n_prompt:].tolist(), f"{settings.decoding.value} output differs from transformers"
    for mode in FAST_MODES:
        ours(mode, prompts32[:2], sample)()  # warm-up
    for compute in ct2_modes:
        ct2(compute, [PROMPT], 128, sampling_topk=1)()  # warm-up

    cases = [
        # (case, work in tokens, exact target, fast target, ours settings, reference kwargs, CTranslate2 kwargs)
        ("batch-1 greedy, 128 new tokens", [PROMPT], 128, ">= 40", ">= 100", greedy, {"do_sample": False}, {"sampling_topk": 1}),
        ("beam search, 5 beams, 64 new tokens", [PROMPT], 64, ">= 20", "", beam, {"do_sample": False, "num_beams": 5}, {"beam_size": 5}),
        ("32 prompts x 64 new, sampling top-p 0.9", prompts32, 32 * 64, ">= 250", ">= 450", sample, {"do_sample": True, "top_p": 0.9}, {"sampling_topk": 50, "sampling_topp": 0.9}),
    ]
    for case, prompts, work, target, fast_target, settings, ref_kw, ct2_kw in cases:
        new = settings.max_new_tokens
        contenders = {mode: ours(mode, prompts, settings) for mode in engines}
        contenders["ref"] = lambda prompts=prompts, ref_kw=ref_kw, new=new: ref_run(prompts, max_new_tokens=new, min_new_tokens=new, **ref_kw)
        for compute in ct2_modes:
            contenders[f"ct2-{compute}"] = ct2(compute, prompts, new, **ct2_kw)
        times = _rounds(contenders, args.repeat)
        report(case, times["none"], times["ref"], "tok/s", work, target)
        for mode in FAST_MODES:
            report(f"{case}, --quantize {mode}", times[mode], times["ref"], "tok/s", work, fast_target)
        for compute in ct2_modes:
            report(f"CTranslate2 {compute}: {case}", times[f"ct2-{compute}"], times["ref"], "tok/s", work)

    machine = f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    lines = [
        "# Benchmark results",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}.",
        f"Model: GPT-2-small shape (124M parameters), random weights, {'real GPT-2 tokenizer' if len(tok) == 50257 else 'tiny tokenizer'};",
        f"every case forces exactly N new tokens; {args.repeat} repeats, medians (best in brackets).",
        "Reference: transformers `generate` on the same weights and settings, in the same run.",
        "Greedy and beam outputs were asserted token-identical to the reference.",
        "Within each case, every engine is timed in alternating rounds, so drift in the machine's speed hits all alike.",
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
