"""Single-stream decoding against the weight-streaming floor (issue 26); writes bench/RESULTS-decode.md.

    git worktree add ../old-7937ef0 7937ef0
    .venv/bin/python bench/decode.py --old ../old-7937ef0 --build main=../old-89a47d9 --threads 1

Batch-1 decoding of GPT-2 small reads every weight matrix once per token, so its speed is bounded
by how fast the CPU streams them. In one run this measures that floor (a batch-1 pass of the kernels
aigc itself uses over every weight matrix of the model, float32 and int8; torch's plain `F.linear`
over the same float32 shapes for comparison) and, in alternating rounds, the engines on the same
weights (GPT-2-small shape, random weights, the real GPT-2 tokenizer; every case forces exactly
N new tokens):

  aigc           this tree
  pre-scheduler  the build before the continuous-batching scheduler (--old, a git worktree of 7937ef0)
  NAME           any other build given as --build NAME=DIR (e.g. main at 89a47d9)
  transformers   `generate` on the same weights (float32; it is also the reference of the int8 case)

Each engine runs in its own worker process with PYTHONPATH set to its source tree and its source
tree as working directory (so an editable install of another tree does not interfere), loaded
and warmed up; every case times each engine once per round, the engines alternating, and
reports medians. Each round starts fresh worker processes (--same-process keeps them): where a
process's weights land in memory moved the same pass over them between 25 and 34 ms here, a bias
that rounds within one process never average out. Cases: batch-1 greedy (exact), batch-1 greedy
--quantize int8, batch-1 top-p sampling, beam search with 5 beams, a 900-token prompt (prefill:
time to the first token; and with -n 5, five sampled sequences of it), 32 prompts sampled together and a file of 64 records with mixed
settings (the batch paths, which must not move), and the README example
(`generate "Hello, how are you?" -n 5`, 44 tokens each) as a whole process, against a bare
`python -c "import torch"` plus 44 decoding steps at the floor.

For each case it prints tokens/s, the weight bytes streamed per second (one pass over the weight
matrices per decoding step) and the per cent of the floor reached (floor time per step / time per
step), as gpt-fast reports them; and, for the builds with today's layout, where a step's time goes
(one extra instrumented run, not timed with the others): the forward pass, processors and sampling,
detokenisation and stop checks, the scheduler's own bookkeeping, and the engine around it; the
conversions of tensors to Python numbers (`.tolist()`, `.item()`, `int()`: host synchronisations
on a GPU, plain reads on the CPU) are counted and timed where they happen.

The batch-1 cases (greedy, int8, top-p) also run once more per round in each build with today's
layout with one pass over the weight matrices after every scheduler step, timed apart: a floor
measured in the same seconds as the steps, which a busy neighbour's load moves alike (on a shared
host the floor taken before a case moved 7.8-13 ms between processes within minutes).

Greedy and beam outputs are asserted identical to transformers'; seeded sampling outputs of every
--build are asserted identical to this tree's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Hello, how are you?"
BATCH_PROMPTS = [
    "The history of the city begins",
    "In a quiet village by the sea, an old fisherman",
    "Scientists announced today that",
    "My favourite recipe for a rainy day is",
]
INTERLEAVED = ("greedy", "int8", "sample")  # the batch-1 cases also measured against a floor taken between their steps
LONG_PROMPT_TOKENS = 900
MIXED_RECORDS = 64  # the mixed-length file case: records as bench/batch.py --mixed makes them
README_TOKENS, README_N = 44, 5

# case -> (engine kind it runs on in aigc builds, what it generates)
CASES: dict[str, dict[str, Any]] = {
    "greedy": {"quantize": "none", "decoding": "greedy", "prompts": 1, "tokens": 128, "title": "batch-1 greedy, exact"},
    "int8": {"quantize": "int8", "decoding": "greedy", "prompts": 1, "tokens": 128, "title": "batch-1 greedy, --quantize int8"},
    "sample": {"quantize": "none", "decoding": "sample", "prompts": 1, "tokens": 128, "title": "batch-1 sampling, top-p 0.9"},
    "beam": {"quantize": "none", "decoding": "beam", "prompts": 1, "tokens": 64, "title": "beam search, 5 beams"},
    "prefill": {"quantize": "none", "decoding": "greedy", "prompts": 1, "tokens": 1, "long": True, "title": f"{LONG_PROMPT_TOKENS}-token prompt, first token"},
    "prefill5": {"quantize": "none", "decoding": "sample", "prompts": 1, "tokens": 1, "long": True, "sequences": 5,
                 "title": f"{LONG_PROMPT_TOKENS}-token prompt, -n 5 sampled, first tokens"},
    "batch32": {"quantize": "none", "decoding": "sample", "prompts": 32, "tokens": 64, "title": "32 prompts x 64, sampling top-p 0.9"},
    "mixed": {"quantize": "none", "decoding": "greedy", "prompts": MIXED_RECORDS, "tokens": 160, "mixed": True,
              "title": f"{MIXED_RECORDS} records of mixed settings (greedy, max_new_tokens 8-160, a quarter stop at \"k\")"},
}


def _set_tokens(n: int) -> None:
    """New tokens of the single-stream cases (beam search: half as many)."""
    for name in ("greedy", "int8", "sample"):
        CASES[name]["tokens"] = n
    CASES["beam"]["tokens"] = max(1, n // 2)


def _mixed_prompts(n: int) -> list[str]:
    """n prompts of 3-40 words, the same in every build (a fixed seed)."""
    import random

    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def _record_settings(case: dict[str, Any], settings: Any, i: int) -> Any:
    """A record's settings: the case's, or for the mixed case max_new_tokens 8..160 and every fourth
    record stopping at "k" (as bench/batch.py --mixed)."""
    if not case.get("mixed"):
        return settings
    return settings.with_overrides(max_new_tokens=8 + (i * 97) % 153, min_new_tokens=0, stop=("k",) if i % 4 == 0 else ())


def _cpu() -> tuple[str, str]:
    """(model name, the CPU's vector and matrix flags) from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == (platform.processor() or "unknown CPU"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx", "fma", "amx", "f16c", "vnni", "bf16")
                flags = " ".join(f for f in line.split(":", 1)[1].split() if any(w in f for w in wanted))
    except OSError:
        pass
    return name, flags


def _long_prompt(path: str) -> str:
    """Text of people (this repository's docs) cut to LONG_PROMPT_TOKENS tokens."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(path + "/tokenizer.json")
    text = " ".join((ROOT / "docs" / name).read_text() for name in sorted(os.listdir(ROOT / "docs")) if name.endswith(".md"))
    ids = tok.encode(text).ids[:LONG_PROMPT_TOKENS]
    return tok.decode(ids)


# -- the worker: one engine in its own process ------------------------------------------------------


def _worker(kind: str, quantize: str, path: str, long_prompt: str) -> None:
    """Answers JSON requests on stdin ({"case": ...} or {"floor": n}) with JSON lines on the stdout
    it started with; anything the engine prints goes to stderr."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch

    def prompts_of(case: dict[str, Any]) -> list[str]:
        if case.get("long"):
            return [long_prompt]
        if case.get("mixed"):
            return _mixed_prompts(case["prompts"])
        return [PROMPT] if case["prompts"] == 1 else [BATCH_PROMPTS[i % 4] for i in range(case["prompts"])]

    if kind == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token, tok.padding_side = tok.eos_token, "left"
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        hf_kw = {"greedy": {"do_sample": False}, "beam": {"do_sample": False, "num_beams": 5}, "sample": {"do_sample": True, "top_p": 0.9}}

        def run(name: str, _breakdown: bool, _interleave: bool = False) -> dict[str, Any]:
            case = CASES[name]
            torch.manual_seed(0)
            started, cpu = time.perf_counter(), time.process_time()
            batch = tok(prompts_of(case), return_tensors="pt", padding=True)
            n = case["tokens"]
            more = {"num_return_sequences": case["sequences"]} if case.get("sequences") else {}
            with torch.inference_mode():
                out = model.generate(**batch, pad_token_id=tok.eos_token_id, max_new_tokens=n, min_new_tokens=n, **hf_kw[case["decoding"]], **more)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            width = batch["input_ids"].shape[1]
            return {"seconds": seconds, "cpu": cpu, "ids": out[0, width:].tolist(), "prompt_tokens": int(batch["attention_mask"][0].sum())}

    else:
        try:  # today's layout
            from aigc_cli.core.settings import Decoding, GenerationSettings
            from aigc_cli.engine.engine import Engine, Request
        except ImportError:  # 7937ef0 and 89a47d9: one flat package
            from aigc_cli.engine import Engine, Request  # type: ignore[no-redef]
            from aigc_cli.settings import Decoding, GenerationSettings  # type: ignore[no-redef]

        engine = Engine.load(path, quantize=quantize)
        settings = {}
        for name, case in CASES.items():
            kw: dict[str, Any] = {"decoding": Decoding(case["decoding"]), "max_new_tokens": case["tokens"], "min_new_tokens": case["tokens"]}
            if case["decoding"] == "beam":
                kw["num_beams"] = 5
            if case["decoding"] == "sample":
                kw["top_p"] = 0.9
            if case.get("sequences"):
                kw["num_sequences"] = case["sequences"]
            settings[name] = GenerationSettings(**kw).resolved()

        def run(name: str, breakdown: bool, interleave: bool = False) -> dict[str, Any]:
            case = CASES[name]
            reqs = [Request(i, p, _record_settings(case, settings[name], i), 1) for i, p in enumerate(prompts_of(case))]
            probe = _Probe() if breakdown else None
            floor_passes = _Interleaved(engine.lm.model) if interleave else None
            started, cpu = time.perf_counter(), time.process_time()
            try:
                completions = list(engine.generate(reqs, batch_size=64))
            finally:
                if floor_passes is not None:
                    floor_passes.remove()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            out = {"seconds": seconds, "cpu": cpu, "ids": list(completions[0].token_ids), "prompt_tokens": completions[0].prompt_tokens}
            if floor_passes is not None:  # the engine's own time, and the floor measured between its steps
                out["seconds"] -= sum(floor_passes.passes)
                out["floor_pass"] = statistics.median(floor_passes.passes)
            if case.get("mixed"):  # every record's tokens, in order, and how many there were
                done = sorted(completions, key=lambda c: c.index)
                out["ids"] = [t for c in done for t in c.token_ids]
                out["new_tokens"] = len(out["ids"])
            if probe is not None:
                out["breakdown"] = probe.finish(seconds)
            return out

    def floor(rounds: int) -> dict[str, Any]:
        return _floor(engine.lm.model if kind != "transformers" else None, rounds)

    proto.write(json.dumps({"ready": True}) + "\n")
    proto.flush()
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            if "floor" in ask:
                answer = floor(ask["floor"])
            elif "lean" in ask:
                answer = _lean_against_batch_step(engine.lm.model, ask["lean"], ask.get("rows", 1))
            else:
                answer = run(ask["case"], ask.get("breakdown", False), ask.get("interleave", False))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which names the engine
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(answer) + "\n")
        proto.flush()


def _lean_against_batch_step(model: Any, steps: int, rows: int = 1) -> dict[str, Any]:
    """Wall and CPU time per decoding step of `rows` rows at one position (one prompt's sequences),
    `steps` steps through the level step (`GPT2.step`, which takes `GPT2._step_level` for them) and
    as many through the batch step (`GPT2._step`) on the same model, alternating in blocks of 8
    steps; the logits are checked equal."""
    import torch

    out: dict[str, list[float]] = {"lean": [0.0, 0.0], "batch": [0.0, 0.0]}
    caches = {name: model.new_slots() for name in out}
    logits = {}
    for name, slots in caches.items():
        slots.reserve(rows, steps + 8)
        logits[name] = model.step(None, slots, [[15496, 11, 703, 389, 345, 30]] * rows)
    token = logits["lean"].argmax(-1)
    for _ in range(steps // 8):
        for name, slots in caches.items():
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(8):
                if name == "lean":
                    logits[name] = model.step(token, slots, [])
                else:
                    logits[name] = model._step(token, slots, [], False, 0)
            out[name][0] += time.perf_counter() - started
            out[name][1] += time.process_time() - cpu
        if not torch.equal(logits["lean"], logits["batch"]):
            raise AssertionError("the level step's logits differ from the batch step's")
        token = logits["lean"].argmax(-1)
    n = steps // 8 * 8
    return {name: {"wall": w / n, "cpu": c / n} for name, (w, c) in out.items()}


def _collect_floor(f: dict[str, Any], got: dict[str, Any]) -> None:
    """Add one floor measurement (a worker's answer) to the run's figures for that precision."""
    f.setdefault("seconds", []).append(got["seconds"])
    f.setdefault("cpu", []).append(got["cpu"])
    f["bytes"] = got["bytes"]
    for label, seconds in got.get("others", {}).items():
        f.setdefault("others", {}).setdefault(label, []).append(seconds)


def _matrices(model: Any) -> list[tuple[Any, int, int]]:
    """(callable, in, out) of every weight matrix of aigc's GPT-2: 4 per layer and the LM head."""
    cfg = model.cfg
    e, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    out = []
    for layer in model.layers:
        attn, proj, fc, fc_out = layer[2], layer[3], layer[6], layer[7]
        out += [(attn, e, 3 * e), (proj, e, e), (fc, e, inner), (fc_out, inner, e)]
    out.append((model.head, e, cfg.vocab_size))
    return out


def _floor(model: Any, rounds: int) -> dict[str, Any]:
    """Median time of a batch-1 pass over every weight matrix with the model's own kernels, and the
    bytes they hold; for a float32 model also torch's plain F.linear over the same shapes."""
    import torch
    import torch.nn.functional as F

    mats = _matrices(model)
    xs = [torch.randn(1, i) for _, i, _ in mats]
    quantized = model.quantize == "int8"
    per_weight = 1 if quantized else 4
    weight_bytes = sum(i * o * per_weight for _, i, o in mats)

    def one(calls: list[Any]) -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        for fn, x in zip(calls, xs):
            fn(x)
        return time.perf_counter() - started, time.process_time() - cpu

    own = [m for m, _, _ in mats]
    for _ in range(2):
        one(own)
    passes = [one(own) for _ in range(rounds)]
    result: dict[str, Any] = {"seconds": statistics.median(w for w, _ in passes), "cpu": statistics.median(c for _, c in passes), "bytes": weight_bytes}
    others: dict[str, Any] = {}
    if not quantized:  # torch's own linear kernel on plain (out, in) float32 weights
        plain = [_bound(F.linear, weight=torch.randn(o, i) * 0.02) for _, i, o in mats]
        others["torch `F.linear` on plain weights"] = plain
    if not quantized and getattr(own[0], "packed", None) is not None:  # oneDNN's one-row kernel: what aigc ran before padding
        others["oneDNN packed, one row unpadded (before `PACKED_MIN_ROWS`)"] = [
            _bound(torch.ops.mkldnn._linear_pointwise, m.packed, m.zero_bias, "none", [], "") for m in own
        ]
    result["others"] = {}
    for label, calls in others.items():
        for _ in range(2):
            one(calls)
        result["others"][label] = statistics.median(one(calls)[0] for _ in range(rounds))
    return result


def _bound(fn: Any, *args: Any, **kw: Any) -> Any:
    """fn(x, *args, **kw) as a function of x."""
    return lambda x: fn(x, *args, **kw)


class _Interleaved:
    """One pass over the model's weight matrices (the floor, as `_floor` makes it) after every
    scheduler step, timed apart: a floor measured in the same moments as the steps it is compared
    with, so that a neighbour's load moves both alike. A step after a pass starts as cold as one
    after a step (each streams every weight)."""

    def __init__(self, model: Any) -> None:
        import torch

        from aigc_cli.engine import scheduler

        mats = _matrices(model)
        calls = [(fn, torch.randn(1, i)) for fn, i, _ in mats]
        self.passes: list[float] = []
        self._owner, self._original = scheduler.Scheduler, scheduler.Scheduler.step
        original, passes = self._original, self.passes

        def step(sched: Any) -> Any:
            events = original(sched)
            started = time.perf_counter()
            for fn, x in calls:
                fn(x)
            passes.append(time.perf_counter() - started)
            return events

        scheduler.Scheduler.step = step  # type: ignore[method-assign]

    def remove(self) -> None:
        self._owner.step = self._original  # type: ignore[method-assign]


class _Probe:
    """Times the parts of today's decode loop by wrapping them (one instrumented run): seconds
    inside the forward pass, processors + sampling, detokenisation + stop checks, the scheduler's
    steps as a whole, and tensor-to-Python conversions."""

    def __init__(self) -> None:
        import torch

        from aigc_cli.engine import decoding, scheduler
        from aigc_cli.models import gpt2

        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._undo: list[tuple[Any, str, Any, bool]] = []
        self._wrap(gpt2.GPT2, "step", "forward")
        # each group's processing and draw (the lone-row step calls it without `_pick` around it)
        self._wrap(scheduler.Scheduler, "_pick_group" if hasattr(scheduler.Scheduler, "_pick_group") else "_pick", "processors + sampling")
        self._wrap(decoding._Row, "push", "detokenisation + stop checks")
        self._wrap(scheduler.Scheduler, "step", "scheduler step")
        for method in ("tolist", "item", "__int__", "__float__"):
            self._wrap(torch.Tensor, method, "tensor -> Python")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        had = name in owner.__dict__
        original = owner.__dict__[name] if had else getattr(owner, name)
        totals, counts = self.totals, self.counts
        totals.setdefault(label, 0.0)
        counts.setdefault(label, 0)

        def timed(*args: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                totals[label] += time.perf_counter() - started
                counts[label] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, had))

    def finish(self, seconds: float) -> dict[str, Any]:
        for owner, name, original, had in reversed(self._undo):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        t = self.totals
        step = t["scheduler step"]
        parts = {
            "forward": t["forward"],
            "processors + sampling": t["processors + sampling"],
            "detokenisation + stop checks": t["detokenisation + stop checks"],
            "scheduler bookkeeping": max(0.0, step - t["forward"] - t["processors + sampling"] - t["detokenisation + stop checks"]),
            "engine around the scheduler": max(0.0, seconds - step) if self.counts["scheduler step"] else 0.0,
        }
        if not self.counts["scheduler step"]:  # a loop of its own (beam search): forward and the rest
            parts["rest of the loop"] = max(0.0, seconds - t["forward"] - t["processors + sampling"] - t["detokenisation + stop checks"])
        return {
            "parts": parts,
            "steps": self.counts["forward"],
            "conversions": self.counts["tensor -> Python"],
            "conversion_seconds": t["tensor -> Python"],
        }


# -- the driver ------------------------------------------------------------------------------------


class Engine:
    """A worker process and how to ask it."""

    tokens = 128  # --tokens, passed on to every worker

    def __init__(self, label: str, kind: str, root: Path | None, quantize: str, path: str, long_prompt: str) -> None:
        self.label, self.kind, self.root, self.quantize = label, kind, root, quantize
        self._args = (label, kind, root, quantize, path, long_prompt)
        env = dict(os.environ)
        cwd = str(root) if root is not None else str(HERE)
        if root is not None:
            env["PYTHONPATH"] = str(root)
        cmd = [sys.executable, str(HERE / "decode.py"), "--worker", kind, "--quantize", quantize, "--model", path, "--tokens", str(self.tokens)]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"long_prompt": long_prompt}) + "\n")
        self.proc.stdin.flush()

    def ready(self) -> None:
        if self._read().get("ready") is not True:
            raise SystemExit(f"{self.label}: the worker did not start")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: the worker exited (see its stderr above)")
        return json.loads(line)

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise SystemExit(f"{self.label}: {answer['error']}")
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()

    def restart(self) -> None:
        """A fresh worker process in place of this one (loaded, not yet warmed up)."""
        self.close()
        self.__init__(*self._args)  # type: ignore[misc]
        self.ready()


def _process_times(commands: dict[str, tuple[list[str], Path | None]], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Whole-process wall times and CPU times (user + system), in alternating rounds whose order
    rotates; each command runs with its source tree on PYTHONPATH and as working directory."""
    import resource

    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cmd, root = commands[name]
            env = dict(os.environ)
            if root is not None:
                env["PYTHONPATH"] = str(root)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run(cmd, cwd=str(root or HERE), env=env, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
            times[name].append(elapsed)
    return times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--old", type=Path, default=ROOT.parent / "old-7937ef0", help="the pre-scheduler build (a worktree of 7937ef0; default ../old-7937ef0)")
    parser.add_argument("--build", action="append", default=[], metavar="NAME=DIR", help="another build to compare (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join([*CASES, "lean", "readme"]), help="comma-separated: " + ", ".join([*CASES, "lean", "readme"]))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-decode.md")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens of the batch-1 cases (beam search: half)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every engine (OMP_NUM_THREADS); 0: torch's default")
    parser.add_argument("--same-process", action="store_true", help="keep each engine's worker process for every round (default: fresh workers each round)")
    parser.add_argument("--note", default="", help="a line about the machine's state for the results file")
    args = parser.parse_args()
    if args.threads:  # inherited by every worker and whole process
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    _set_tokens(args.tokens)
    if args.worker:
        first = json.loads(sys.stdin.readline())
        _worker(args.worker, args.quantize, args.model, first["long_prompt"])
        return

    Engine.tokens = args.tokens
    sys.path.insert(0, str(HERE))
    from make_model import build

    path = str(build())
    cases = [c for c in args.cases.split(",") if c]
    builds: dict[str, Path | None] = {"aigc": ROOT}
    if args.old and args.old.exists():
        builds["pre-scheduler"] = args.old.resolve()
    for item in args.build:
        name, _, where = item.partition("=")
        builds[name] = Path(where).resolve()
    long_prompt = _long_prompt(path)
    quantizes = sorted({CASES[c]["quantize"] for c in cases if c in CASES})
    engines: dict[tuple[str, str], Engine] = {}
    for name, root in builds.items():
        for q in quantizes:
            engines[(name, q)] = Engine(f"{name} ({q})", "aigc", root, q, path, long_prompt)
    if any(c in CASES for c in cases):
        engines[("transformers", "none")] = Engine("transformers", "transformers", None, "none", path, long_prompt)
    for engine in engines.values():
        engine.ready()

    lines: list[str] = []
    cpu, flags = _cpu()
    import torch

    # the floor, in each precision, with aigc's kernels (this tree's model in its worker)
    floors: dict[str, dict[str, Any]] = {}

    def measure_floors() -> None:
        for q in quantizes:
            got = engines[("aigc", q)].ask(floor=10)
            _collect_floor(floors.setdefault(q, {}), got)

    results: dict[str, dict[str, list[float]]] = {}
    cpu_times: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, dict[str, list[int]]] = {}
    breakdowns: dict[str, dict[str, Any]] = {}
    prompt_tokens: dict[str, int] = {}
    new_tokens: dict[str, int] = {}
    round_floor: dict[str, list[tuple[float, float]]] = {}  # per case, each round's floor (wall, CPU), measured in that round's worker
    interleaved: dict[str, dict[str, list[tuple[float, float]]]] = {}  # per case and build, each round's (step, floor pass between steps)
    for case in (c for c in cases if c in CASES):
        spec = CASES[case]
        q = spec["quantize"]
        # the batch path (32 rows, the mixed file) is compared with the builds that have a scheduler only
        contenders = [(name, engines[(name, q)]) for name in builds if case not in ("batch32", "mixed") or name != "pre-scheduler"]
        if (spec["decoding"] != "sample" or case in ("sample", "prefill5")) and case != "mixed":
            contenders.append(("transformers", engines[("transformers", "none")]))
        outputs[case] = {}
        for name, engine in contenders:  # warm-up, outputs checked
            got = engine.ask(case=case)
            outputs[case][name] = got["ids"]
            new_tokens[case] = got.get("new_tokens", spec["tokens"] * spec["prompts"])
            prompt_tokens[case] = got["prompt_tokens"]
        times: dict[str, list[float]] = {name: [] for name, _ in contenders}
        cpus: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for r in range(args.rounds):
            if r and not args.same_process:  # fresh workers each round: where a process's weights land moves its speed
                for name, engine in contenders:
                    engine.restart()
                    engine.ask(case=case)  # warm-up
                for q_other in quantizes:  # the floors' workers too
                    if q_other != q:
                        engines[("aigc", q_other)].restart()
            measure_floors()
            round_floor.setdefault(case, []).append((floors[q]["seconds"][-1], floors[q]["cpu"][-1]))
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for name, engine in order:
                got = engine.ask(case=case)
                times[name].append(got["seconds"])
                cpus[name].append(got["cpu"])
            if case in INTERLEAVED:
                for name, engine in order:
                    if name in builds and _has_scheduler(builds[name]):
                        got = engine.ask(case=case, interleave=True)
                        interleaved.setdefault(case, {}).setdefault(name, []).append((got["seconds"] / spec["tokens"], got["floor_pass"]))
        results[case], cpu_times[case] = times, cpus
        for name, root in builds.items():
            if _has_scheduler(root):
                breakdowns.setdefault(case, {})[name] = engines[(name, q)].ask(case=case, breakdown=True)["breakdown"]
        print(f"{spec['title']}: " + ", ".join(f"{n} {statistics.median(t):.3f} s" for n, t in times.items()), flush=True)

    lean: dict[str, dict[str, list[float]]] = {}
    if "lean" in cases:  # this tree's level step against its batch step, same model, same process: 1 row, the README's 5
        eng = engines.get(("aigc", "none")) or Engine("aigc (none)", "aigc", ROOT, "none", path, long_prompt)
        if ("aigc", "none") not in engines:
            eng.ready()
            engines[("aigc", "none")] = eng
        for _ in range(args.rounds):
            for rows in (1, README_N):
                got = eng.ask(lean=96, rows=rows)
                for name, t in got.items():
                    key = f"{name}, {rows} row{'s' if rows > 1 else ''}"
                    lean.setdefault(key, {"wall": [], "cpu": []})
                    lean[key]["wall"].append(t["wall"])
                    lean[key]["cpu"].append(t["cpu"])
        print("lean step: " + ", ".join(f"{n} {statistics.median(t['cpu']) * 1e3:.1f} ms CPU" for n, t in lean.items()), flush=True)

    # correctness: greedy and beam as transformers; seeded sampling as this tree
    checks: list[str] = []
    for case, outs in outputs.items():
        if CASES[case].get("mixed"):  # no transformers run: the other builds against this tree
            for name in builds:
                if name not in ("aigc", "pre-scheduler"):
                    same = outs[name] == outs["aigc"]
                    checks.append(f"{CASES[case]['title']}: {name} {'identical to' if same else 'DIFFERS from'} this tree")
        elif CASES[case]["decoding"] in ("greedy", "beam") and CASES[case]["quantize"] == "none":
            for name in builds:
                same = outs[name] == outs["transformers"]
                checks.append(f"{CASES[case]['title']}: {name} {'identical to' if same else 'DIFFERS from'} transformers")
                if name == "aigc":
                    assert same, f"{case}: aigc differs from transformers"
        if CASES[case]["decoding"] == "sample":
            for name in builds:
                if name not in ("aigc", "pre-scheduler"):
                    same = outs[name] == outs["aigc"]
                    checks.append(f"{CASES[case]['title']}: {name} {'identical to' if same else 'DIFFERS from'} this tree (seed 1)")
    for engine in engines.values():
        engine.close()

    # the README example as a whole process, and the bare import of torch
    readme_times: dict[str, list[float]] = {}
    readme_cpu: dict[str, list[float]] = {}
    if "readme" in cases:
        cli = ["generate", PROMPT, "-n", str(README_N), "--max-new-tokens", str(README_TOKENS), "--min-new-tokens", str(README_TOKENS)]
        cli += ["--seed", "1", "--format", "jsonl", "--model", path]
        commands: dict[str, tuple[list[str], Path | None]] = {"import torch": ([sys.executable, "-c", "import torch"], None)}
        for name, root in builds.items():
            commands[name] = ([sys.executable, "-m", "aigc_cli", *cli], root)
        commands["transformers"] = ([sys.executable, "-c", _HF_README, path], None)
        readme_times, readme_cpu = _process_times(commands, args.rounds)
        print("README example: " + ", ".join(f"{n} {statistics.median(t):.2f} s" for n, t in readme_times.items()), flush=True)
        if not floors.get("none", {}).get("seconds"):
            eng = Engine("aigc (none)", "aigc", ROOT, "none", path, long_prompt)
            eng.ready()
            for _ in range(args.rounds):
                _collect_floor(floors.setdefault("none", {}), eng.ask(floor=10))
            eng.close()

    # -- report ----------------------------------------------------------------------------------
    med = statistics.median
    lines += [
        "# Single-stream decoding against the weight-streaming floor (bench/decode.py)",
        "",
        f"Run on {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: {cpu}, {os.cpu_count()} cores "
        f"(flags: {flags}), torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} torch threads.",
        "Model: GPT-2-small shape (124M parameters), random weights, the real GPT-2 tokenizer; every case forces exactly N new tokens.",
        f"{args.rounds} rounds, engines alternating within each round (the order rotating), "
        + ("each engine in one worker process throughout" if args.same_process else "each round in fresh worker processes")
        + ", medians (best in brackets).",
        "Builds: " + ", ".join(f"{n} = {r if r is not None else '-'}" for n, r in builds.items()) + "; transformers "
        + _version("transformers") + " `generate` (float32, also the reference of the int8 case).",
    ]
    if args.note:
        lines += ["", args.note]
    lines += ["", "## The floor (measured in every round, before each case's engines)", ""]
    lines += ["| precision | kernels | weight bytes per step | time per pass | CPU time per pass | GB/s | tokens/s at the floor |", "|---|---|---:|---:|---:|---:|---:|"]
    for q, f in floors.items():
        if not f.get("seconds"):
            continue
        s, b = med(f["seconds"]), f["bytes"]
        kern = "oneDNN packed (aigc's `_Linear`)" if q == "none" else "fbgemm dynamic int8 (aigc's `Int8Linear`)"
        lines.append(f"| {'float32' if q == 'none' else q} | {kern} | {b / 1e6:.0f} MB | {s * 1e3:.2f} ms (min {min(f['seconds']) * 1e3:.2f}) | {med(f['cpu']) * 1e3:.2f} ms | {b / s / 1e9:.1f} | {1 / s:.1f} |")
        for label, times in f.get("others", {}).items():
            t = med(times)
            lines.append(f"| float32 | {label} | {b / 1e6:.0f} MB | {t * 1e3:.2f} ms (min {min(times) * 1e3:.2f}) | - | {b / t / 1e9:.1f} | {1 / t:.1f} |")
    lines += ["", "## Cases", "",
              "% of floor: the median over the rounds of that round's floor (measured in that round's worker of this tree) "
              "over that round's time per step.", ""]
    lines += ["| case | engine | time | tokens/s | per step | GB/s | % of floor | CPU per step | % of floor (CPU time) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, times in results.items():
        spec = CASES[case]
        q = spec["quantize"]
        weight_bytes = floors.get(q, {}).get("bytes", 0)
        steps = spec["tokens"]
        new = new_tokens.get(case, spec["tokens"] * spec["prompts"])
        for name, t in times.items():
            m = med(t)
            per_step = m / steps
            cpu_step = med(cpu_times[case][name]) / steps
            single = spec["prompts"] == 1 and spec["decoding"] != "beam" and not spec.get("long")
            # each round's own floor against that round's step (a fresh worker each round): where a
            # process's weights land moves both alike
            pairs = list(zip(round_floor.get(case, []), t, cpu_times[case][name]))
            pct_cpu = f"{100 * statistics.median(f[1] * steps / c for f, _, c in pairs):.0f}%" if pairs and single else "-"
            if spec.get("long"):
                tps = f"{prompt_tokens[case] / m:.0f} prompt tok/s"
                gbs = pct = "-"
            else:
                tps = f"{new / m:.1f} (best {new / min(t):.1f})"
                gbs = f"{weight_bytes / per_step / 1e9:.1f}" if weight_bytes and spec["prompts"] == 1 else "-"
                pct = f"{100 * statistics.median(f[0] * steps / w for f, w, _ in pairs):.0f}%" if pairs and single else "-"
            step_ms, cpu_ms = (f"{per_step * 1e3:.1f} ms", f"{cpu_step * 1e3:.1f} ms") if not spec.get("mixed") else ("-", "-")
            lines.append(f"| {spec['title']} | {name} | {m:.3f} s (min {min(t):.3f}) | {tps} | {step_ms} | {gbs} | {pct} | {cpu_ms} | {pct_cpu} |")
    if interleaved:
        lines += ["", "## Against a floor measured between the steps (one pass over the weight matrices after every step, same process)", "",
                  "A second run per round of each build with today's layout: after every scheduler step, one batch-1 pass over the "
                  "model's weight matrices with its own kernels, timed apart (the step's time excludes it). Step and floor are then "
                  "measured in the same seconds, so a busy neighbour slows both alike. Ratio: the median over the rounds of each "
                  "round's step / floor; target 1.15x.", ""]
        lines += ["| case | build | per step | floor pass | step / floor | within 1.15x |", "|---|---|---:|---:|---:|---|"]
        for case, per in interleaved.items():
            for name, pairs in per.items():
                ratio = med(st / fl for st, fl in pairs)
                lines.append(f"| {CASES[case]['title']} | {name} | {med(st for st, _ in pairs) * 1e3:.2f} ms | {med(fl for _, fl in pairs) * 1e3:.2f} ms | "
                             f"{ratio:.3f} (rounds: {', '.join(f'{st / fl:.3f}' for st, fl in pairs)}) | {'yes' if ratio <= 1.15 else 'no'} |")
    if readme_times:
        floor_s = med(floors["none"]["seconds"])
        bare = med(readme_times["import torch"])
        lines += ["", "## The README example as a whole process", ""]
        lines += [f"`aigc generate \"{PROMPT}\" -n {README_N}` with {README_TOKENS} forced tokens each, `--seed 1 --format jsonl`, as `python -m aigc_cli` "
                  "with each build on PYTHONPATH; transformers: load and `generate` in a script.", ""]
        lines += ["| process | median | min | CPU time (user + system), median |", "|---|---:|---:|---:|"]
        for name, t in readme_times.items():
            lines.append(f"| {name} | {med(t):.2f} s | {min(t):.2f} s | {med(readme_cpu[name]):.2f} s |")
        target = bare + README_TOKENS * floor_s
        lines += ["", f"Target: `import torch` ({bare:.2f} s) + {README_TOKENS} steps at the float32 floor ({README_TOKENS * floor_s:.2f} s) "
                  f"+ 0.5 s = **{target + 0.5:.2f} s**; aigc {med(readme_times['aigc']):.2f} s "
                  f"({'met' if med(readme_times['aigc']) <= target + 0.5 else 'missed by %.2f s' % (med(readme_times['aigc']) - target - 0.5)})."]
        cpu_target = med(readme_cpu["import torch"]) + README_TOKENS * med(floors["none"]["cpu"])
        mine = med(readme_cpu["aigc"])
        lines += ["", f"The same in CPU time (robust to a busy neighbour only with one torch thread): {cpu_target:.2f} s + 0.5 s = **{cpu_target + 0.5:.2f} s**; "
                  f"aigc {mine:.2f} s ({'met' if mine <= cpu_target + 0.5 else 'missed by %.2f s' % (mine - cpu_target - 0.5)})."]
    if breakdowns:
        lines += ["", "## Where a step's time goes (one instrumented run per build and case, ms per step)", ""]
        lines += ["| case | build | steps | forward | processors + sampling | detokenisation + stop checks | scheduler bookkeeping | engine around it | tensor -> Python (count, ms, inside the others) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for case, per in breakdowns.items():
            for name, b in per.items():
                steps = max(1, b["steps"])
                p = b["parts"]
                rest = p.get("rest of the loop")
                lines.append(
                    f"| {CASES[case]['title']} | {name} | {b['steps']} | {p['forward'] / steps * 1e3:.2f} | {p['processors + sampling'] / steps * 1e3:.2f} | "
                    f"{p['detokenisation + stop checks'] / steps * 1e3:.2f} | {p['scheduler bookkeeping'] / steps * 1e3:.2f} | "
                    f"{(rest if rest is not None else p['engine around the scheduler']) / steps * 1e3:.2f}{' (own loop)' if rest is not None else ''} | "
                    f"{b['conversions']}, {b['conversion_seconds'] / steps * 1e3:.2f} |"
                )
    if lean:
        lines += ["", f"## The level step against the batch step (this tree, same model and process, 96 steps a round, {args.threads or 'default'} torch threads)", ""]
        lines += ["| step | wall per step (median) | CPU per step (median) |", "|---|---:|---:|"]
        for name, t in lean.items():
            kind, rows = name.split(", ")
            label = f"level (`GPT2._step_level`, taken by `GPT2.step` for rows at one position), {rows}" if kind == "lean" else f"batch (`GPT2._step`), {rows}"
            lines.append(f"| {label} | {med(t['wall']) * 1e3:.2f} ms | {med(t['cpu']) * 1e3:.2f} ms |")
        lines.append("")
        lines.append("The logits of the two were checked equal (torch.equal) after every block of 8 steps.")
    if checks:
        lines += ["", "## Outputs", "", *[f"- {c}" for c in checks]]
    lines += ["", "Rerun: `git worktree add ../old-7937ef0 7937ef0`, then `.venv/bin/python bench/decode.py --old ../old-7937ef0 "
              "[--build NAME=DIR] [--threads 1] [--tokens 128] [--rounds 5]`.", ""]
    text = "\n".join(lines)
    print(text)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


def _has_scheduler(root: Path | None) -> bool:
    """A build with today's layout (its scheduler where the probes hook in)."""
    return root is not None and (root / "aigc_cli" / "engine" / "scheduler.py").exists()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - only for the report
        return "?"


_HF_README = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok("Hello, how are you?", return_tensors="pt")
torch.manual_seed(1)
out = model.generate(**ids, do_sample=True, num_return_sequences=5, max_new_tokens=44, min_new_tokens=44, pad_token_id=tok.eos_token_id)
for seq in out:
    print(tok.decode(seq))
"""


if __name__ == "__main__":
    main()
