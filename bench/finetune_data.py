"""Fine-tuning data benchmark: time to the first step and peak memory of `aigc finetune` on large
corpora (GPT-2 small's shape with random weights and the real GPT-2 tokenizer, from make_model.py).
Writes bench/RESULTS-finetune-data.md.

Each corpus is generated here: paragraphs of Zipf-distributed words from GPT-2's vocabulary (about
30,000 distinct words, numbers and punctuation), a 20 MB pool of them repeated in a new order until
the size is reached. A run is `aigc finetune CORPUS -o DIR --steps 1 --val-split 0 --batch-size 1`
(default block: 1024); the clock stops when it prints "training on ..." (data read and tokenized,
model loaded: the first step starts next), and the process's peak RSS (VmHWM) is read then.

    .venv/bin/python bench/finetune_data.py                       # 50 MB and 500 MB, this tree
    .venv/bin/python bench/finetune_data.py --base 196919b        # also the base commit on 50 MB
    .venv/bin/python bench/finetune_data.py --sizes 5 --base-max 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from make_model import build  # noqa: E402
from run import _cpu  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
MB = 1_000_000


def _words(model: Path) -> list[str]:
    """Whole words of GPT-2's vocabulary ("Ġword" entries), most frequent-looking first."""
    vocab = json.loads((model / "vocab.json").read_text()) if (model / "vocab.json").exists() else {}
    if not vocab:
        vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    words = [t[1:] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t.startswith("Ġ") and t[1:].isalpha()]
    return words or ["the", "sea", "is", "calm", "tonight"]


def _pool(words: list[str], size: int, seed: int) -> list[str]:
    """Paragraphs of about `size` characters in all: sentences of 4-24 Zipf-drawn words, now and then
    a number, a comma or a question; 1-7 sentences a paragraph."""
    rng = random.Random(seed)
    weights = [1 / (rank + 10) for rank in range(len(words))]
    cum = [0.0] * len(weights)
    total = 0.0
    for i, w in enumerate(weights):
        total += w
        cum[i] = total
    paragraphs, length = [], 0
    while length < size:
        draws = rng.choices(words, cum_weights=cum, k=2000)
        k, sentences = 0, []
        for _ in range(rng.randint(1, 7)):
            n = rng.randint(4, 24)
            sentence = draws[k : k + n]
            k += n
            if rng.random() < 0.2:
                sentence.insert(rng.randrange(len(sentence)), str(rng.randint(1, 99999)))
            if rng.random() < 0.3:
                sentence[rng.randrange(len(sentence))] += ","
            sentences.append(" ".join(sentence).capitalize() + rng.choice(".....?!"))
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        length += len(paragraph) + 2
    return paragraphs


def make_corpus(path: Path, size: int, words: list[str]) -> None:
    """`size` bytes of text: the pool's paragraphs in a new order each round, blank lines between."""
    pool = _pool(words, min(size, 20 * MB), seed=0)
    written, round_ = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size:
            order = list(range(len(pool)))
            random.Random(round_).shuffle(order)
            for i in order:
                text = pool[i] + "\n\n"
                fh.write(text)
                written += len(text.encode())
                if written >= size:
                    break
            round_ += 1


def first_step(corpus: Path, model: Path, tmp: Path, pythonpath: str | None, timeout: float) -> dict[str, object]:
    """Seconds until "training on" and the peak RSS (MiB) by then, of one `aigc finetune` process."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = tmp / f"out-{time.monotonic_ns()}"
    cmd = [PY, "-m", "aigc_cli", "finetune", str(corpus), "-o", str(out), "--model", str(model), "--steps", "1",
           "--val-split", "0", "--batch-size", "1", "--save-every", "0", "--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    result: dict[str, object] = {"seconds": None, "peak_mib": None, "note": ""}
    deadline = start + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("training on"):
            result["seconds"] = time.perf_counter() - start
            result["peak_mib"] = _hwm_mib(proc.pid)
            result["note"] = line.strip()
            break
        if time.perf_counter() > deadline:
            result["note"] = "timed out"
            break
        result["note"] = line.strip()  # the last thing it said, should it fail
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return result


def _hwm_mib(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return None


def _base_tree(rev: str, tmp: Path) -> Path:
    """The package as of `rev`, unpacked (git archive) for PYTHONPATH; the work tree is not touched."""
    target = tmp / f"base-{rev}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "aigc_cli", "prompts"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.001,50,500", help="corpus sizes in MB, comma-separated (0.001: the fixed cost)")
    ap.add_argument("--base", help="also run this commit (e.g. the branch's base) on the corpora up to --base-max MB")
    ap.add_argument("--base-max", type=float, default=50)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "RESULTS-finetune-data.md"))
    args = ap.parse_args()
    model = build()
    words = _words(model)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "aigc_cli"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        base = _base_tree(args.base, tmp) if args.base else None
        for size_mb in (float(s) for s in args.sizes.split(",")):
            corpus = tmp / f"corpus-{size_mb:g}MB.txt"
            t0 = time.perf_counter()
            make_corpus(corpus, int(size_mb * MB), words)
            print(f"{size_mb:g} MB corpus written in {time.perf_counter() - t0:.0f} s", flush=True)
            runs = [(f"this tree ({commit}{', modified' if dirty else ''})", None)]
            if base is not None and size_mb <= args.base_max:
                runs.append((f"base ({args.base})", str(base)))
            for name, pythonpath in runs:
                r = first_step(corpus, model, tmp, pythonpath, args.timeout)
                print(f"{size_mb:g} MB, {name}: {r}", flush=True)
                rows.append((size_mb, name, r))
            corpus.unlink()
    lines = [
        "# Fine-tuning data benchmark (bench/finetune_data.py)",
        "",
        f"Run {datetime.date.today()} on {_cpu()} ({os.cpu_count()} cores, shared), commit {commit}"
        f"{' with uncommitted changes' if dirty else ''}; GPT-2 small's shape (random weights) and the real GPT-2 tokenizer; "
        "`aigc finetune CORPUS --steps 1 --val-split 0 --batch-size 1` (block 1024). Time from the process's start to "
        "\"training on ...\" (data checked and tokenized, model loaded: the first step starts next), and its peak RSS by then.",
        "",
        "| corpus | code | time to first step | peak RSS | memory per byte of text, above the smallest corpus's |",
        "|---:|---|---:|---:|---:|",
    ]
    fixed = {name: r["peak_mib"] for size_mb, name, r in reversed(rows)}  # each code's smallest corpus
    for size_mb, name, r in rows:
        secs, peak = r["seconds"], r["peak_mib"]
        if secs is None or not isinstance(peak, int):
            lines.append(f"| {size_mb:g} MB | {name} | failed: {r['note']} | | |")
            continue
        base_peak = fixed[name]
        per_byte = f"{(peak - base_peak) * 1048576 / (size_mb * MB):.1f} bytes" if isinstance(base_peak, int) and peak != base_peak else ""
        lines.append(f"| {size_mb:g} MB | {name} | {secs:.1f} s | {peak} MiB | {per_byte} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
