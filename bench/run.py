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


def _rounds(contenders: dict[str, Any], repeat: int, inner: bool = False) -> dict[str, list[float]]:
    """Wall times of each contender, measured in alternating rounds (A B C, A B C, ...), so that
    this machine's drifting speed (up to 1.7x between runs) affects them alike. `inner`: each
    contender returns its own time (measured inside a worker process)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            started = time.perf_counter()
            result = fn()
            times[name].append(result if inner else time.perf_counter() - started)
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


CASE_SETTINGS = {  # case -> (prompts, new tokens)
    "greedy": ([PROMPT], 128),
    "beam": ([PROMPT], 64),
    "sample32": ([CASE_PROMPTS[i % 4] for i in range(32)], 64),
}


def _worker(kind: str, path: str, ct2_dir: str, conn: Any) -> None:
    """One engine in its own process: answers a case name with (seconds, first sequence's new
    token ids), None to stop. kind: an aigc --quantize mode, "ref" (transformers) or "ct2-<compute>"."""
    sys.path.insert(0, str(HERE.parent))
    if kind.startswith("ct2-"):  # no torch in this process
        import ctranslate2
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(path + "/tokenizer.json")
        gen = ctranslate2.Generator(ct2_dir, device="cpu", compute_type=kind[4:], intra_threads=2)
        ct2_kw = {"greedy": {"sampling_topk": 1}, "beam": {"beam_size": 5}, "sample32": {"sampling_topk": 50, "sampling_topp": 0.9}}

        def run(case: str) -> list[int]:
            prompts, n = CASE_SETTINGS[case]
            out = gen.generate_batch(
                [tok.encode(p).tokens for p in prompts], max_length=n, min_length=n, include_prompt_in_result=False, **ct2_kw[case]
            )
            assert all(len(seq) == n for r in out for seq in r.sequences_ids)
            return out[0].sequences_ids[0]

    elif kind == "ref":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(path)
        hf_tok.pad_token, hf_tok.padding_side = hf_tok.eos_token, "left"
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ref_kw = {"greedy": {"do_sample": False}, "beam": {"do_sample": False, "num_beams": 5}, "sample32": {"do_sample": True, "top_p": 0.9}}
        torch.manual_seed(0)

        def run(case: str) -> list[int]:
            prompts, n = CASE_SETTINGS[case]
            batch = hf_tok(prompts, return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**batch, pad_token_id=hf_tok.eos_token_id, max_new_tokens=n, min_new_tokens=n, **ref_kw[case])
            return out[0, batch["input_ids"].shape[1] :].tolist()

    else:
        from aigc_cli.engine.engine import Engine, Request
        from aigc_cli.core.settings import Decoding
        from aigc_cli.core.settings import GenerationSettings as S

        engine = Engine.load(path, quantize=kind)
        settings = {
            "greedy": S(decoding=Decoding.greedy, max_new_tokens=128, min_new_tokens=128).resolved(),
            "beam": S(decoding=Decoding.beam, num_beams=5, max_new_tokens=64, min_new_tokens=64).resolved(),
            "sample32": S(max_new_tokens=64, min_new_tokens=64, top_p=0.9).resolved(),
        }

        def run(case: str) -> list[int]:
            reqs = [Request(i, p, settings[case], 1) for i, p in enumerate(CASE_SETTINGS[case][0])]
            completions = list(engine.generate(reqs, batch_size=64))
            return completions[0].token_ids

    conn.send("ready")
    while (case := conn.recv()) is not None:
        started = time.perf_counter()
        ids = run(case)
        conn.send((time.perf_counter() - started, list(ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    from make_model import build

    path = str(build())
    import torch
    import transformers

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
    from aigc_cli.models.quantize import int8_cache_dir

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

    # 2. in-process throughput on the same weights: each engine in its own worker process (a
    # CTranslate2 in the same process slows torch's kernels by ~10%, measured), timed in
    # alternating rounds
    import multiprocessing

    kinds = ["none", *FAST_MODES, "ref", *(f"ct2-{c}" for c in ct2_modes)]
    spawn = multiprocessing.get_context("spawn")
    workers = {}
    for kind in kinds:
        mine, theirs = spawn.Pipe()
        proc = spawn.Process(target=_worker, args=(kind, path, str(ct2_dir), theirs), daemon=True)
        proc.start()
        workers[kind] = (proc, mine)
    for kind, (_, conn) in workers.items():
        if conn.recv() != "ready":
            raise SystemExit(f"worker {kind} failed to start")

    def ask(kind: str, case: str) -> tuple[float, list[int]]:
        conn = workers[kind][1]
        conn.send(case)
        return conn.recv()

    for case in ("greedy", "beam"):  # the exact mode's output is the reference's
        assert ask("none", case)[1] == ask("ref", case)[1], f"{case} output differs from transformers"
    for kind in kinds:
        ask(kind, "greedy")  # warm-up

    cases = [
        ("batch-1 greedy, 128 new tokens", "greedy", 128, ">= 40", ">= 100"),
        ("beam search, 5 beams, 64 new tokens", "beam", 64, ">= 20", ""),
        ("32 prompts x 64 new, sampling top-p 0.9", "sample32", 32 * 64, ">= 250", ">= 450"),
    ]
    for case, key, work, target, fast_target in cases:
        times = _rounds({kind: (lambda kind=kind, key=key: ask(kind, key)[0]) for kind in kinds}, args.repeat, inner=True)
        report(case, times["none"], times["ref"], "tok/s", work, target)
        for mode in FAST_MODES:
            report(f"{case}, --quantize {mode}", times[mode], times["ref"], "tok/s", work, fast_target)
        for compute in ct2_modes:
            report(f"CTranslate2 {compute}: {case}", times[f"ct2-{compute}"], times["ref"], "tok/s", work)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(path + "/tokenizer.json").get_vocab_size()

    machine = f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    lines = [
        "# Benchmark results",
        "",
        f"Run on {datetime.date.today().isoformat()}: {machine}.",
        f"Model: GPT-2-small shape (124M parameters), random weights, {'real GPT-2 tokenizer' if vocab == 50257 else 'tiny tokenizer'};",
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
