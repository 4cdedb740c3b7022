"""Start-up of a whole `aigc generate` process on the built-in model, against the floor every run
pays: a bare `python -c "import torch"`. In one run, alternating rounds (the order rotates every
round, so that a busy neighbour on a shared machine hits every case alike), each round times:

  (a) `python -c "import torch"`
  (a') `python -c "import torch, os; os._exit(0)"`: the same without the interpreter's teardown,
      which aigc skips (it leaves with os._exit once its output is flushed), for information
  (b) `aigc generate "Hello, how are you?" -n 5 --model tiny-random` with this tree's code
  (c) the same with an earlier build (--before DIR, a copy of aigc's source, or --before-commit REV,
      which `git archive`s that commit into a temporary directory), when given
  (d) (b) with extra environment variables (--also-env OMP_NUM_THREADS=1), when given

It prints the median and min of each case, (b) - (a) and the target: (b) within 0.6 s of (a). Every
case runs as `python -m aigc_cli` with PYTHONPATH set to its source tree (so an editable install
of another tree does not interfere) from an empty working directory (`-m` puts the working
directory first on sys.path), from bytecode compiled beforehand, as an installed package runs;
stdout goes to /dev/null, so rendering is the plain one.

    .venv/bin/python bench/startup.py --before-commit d36ef27
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Hello, how are you?"
TARGET_S = 0.6


def generate_command(python: str) -> list[str]:
    return [python, "-m", "aigc_cli", "generate", PROMPT, "-n", "5", "--model", "tiny-random"]


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return elapsed


def machine() -> str:
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
    except OSError:
        pass
    return f"{model}, {cores} cores"


def commit(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+uncommitted changes" if dirty else "")


def export(rev: str, into: Path) -> Path:
    """The source of commit `rev` of this repository, as files under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, help="source tree of an earlier build (the directory holding aigc_cli/)")
    ap.add_argument("--before-commit", help="an earlier commit of this repository, exported for case (c)")
    ap.add_argument("--also-env", action="append", default=[], metavar="VAR=VALUE", help="case (d): (b) with these variables set")
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the environment to time (default: this one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"(b) aigc generate, this tree": ROOT}
        before = args.before
        if args.before_commit:
            (Path(tmp) / "before").mkdir()
            before = export(args.before_commit, Path(tmp) / "before")
        if before is not None:
            if not (before / "aigc_cli").is_dir():
                raise SystemExit(f"--before {before}: no aigc_cli/ there")
            trees[f"(c) aigc generate, before ({args.before_commit or before})"] = before
        for tree in trees.values():  # bytecode, as a pip-installed package has it
            compileall.compile_dir(str(tree / "aigc_cli"), quiet=1)

        base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cases: dict[str, tuple[list[str], dict[str, str]]] = {
            "(a) python -c 'import torch'": ([args.python, "-c", "import torch"], base),
            "(a') import torch, then os._exit(0)": ([args.python, "-c", "import torch, os; os._exit(0)"], base),
        }
        for label, tree in trees.items():
            cases[label] = (generate_command(args.python), {**base, "PYTHONPATH": str(tree)})
        if args.also_env:
            extra = dict(v.split("=", 1) for v in args.also_env)
            cases[f"(d) (b) with {' '.join(args.also_env)}"] = (generate_command(args.python), {**base, "PYTHONPATH": str(ROOT), **extra})

        cwd = tempfile.mkdtemp(dir=tmp)
        for label, tree in trees.items():  # the code each case runs, checked
            where = subprocess.run(
                [args.python, "-c", "import aigc_cli; print(aigc_cli.__file__)"], env=cases[label][1], cwd=cwd, capture_output=True, text=True
            ).stdout.strip()
            if not Path(where).resolve().is_relative_to(tree.resolve()):
                raise SystemExit(f"{label}: runs {where}, not the code in {tree}")
            print(f"{label}: {where}")
        for cmd, env in cases.values():  # warm the page cache; not counted
            timed(cmd, env, cwd)
        times: dict[str, list[float]] = {label: [] for label in cases}
        labels = list(cases)
        for r in range(args.rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                times[label].append(timed(*cases[label], cwd))
            print(f"round {r + 1}: " + ", ".join(f"{label.split(')')[0]}) {times[label][-1]:.2f} s" for label in labels), flush=True)

    floor = times[labels[0]]
    print()
    print(f"{datetime.date.today()}, {machine()}, commit {commit(ROOT)}, python {platform.python_version()}, {args.rounds} rounds")
    print(f"{'case':<58} {'median':>8} {'min':>8}")
    for label in labels:
        print(f"{label:<58} {statistics.median(times[label]):7.2f}s {min(times[label]):7.2f}s")
    print()
    for label in labels[2:]:
        dm = statistics.median(times[label]) - statistics.median(floor)
        dmin = min(times[label]) - min(floor)
        print(f"{label.split(')')[0]}) - (a): median {dm:+.2f} s, min {dmin:+.2f} s")
    b = labels[2]
    dm = statistics.median(times[b]) - statistics.median(times[labels[1]])
    print(f"(b) - (a'): median {dm:+.2f} s (what aigc adds to importing torch, teardown left out of both)")
    gap = statistics.median(times[b]) - statistics.median(floor)
    verdict = "met" if gap <= TARGET_S else "missed"
    print(f"target: (b) within {TARGET_S} s of (a): {verdict} ({gap:+.2f} s, medians)")


if __name__ == "__main__":
    main()
