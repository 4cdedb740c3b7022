"""lm-evaluation-harness gives the same results through `aigc serve` (its `local-completions`
model) as through its own `hf` backend on the same weights, item by item: loglikelihood (also
where end-of-text follows the continuation or ends it), multiple choice, rolling loglikelihood over
documents longer than the context, and greedy generation with stop sequences.

Every run is lm-eval's own CLI (`python -m lm_eval run`), as a user runs it, on the tasks of
tests/lm_eval_tasks/ (local JSON files, nothing downloaded), with `--log_samples`: one with `hf`,
two through the server (SERVED); the test compares the per-item samples they write.
docs/lm-eval.md describes the settings and the figures measured.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.serving import KEY, Server

pytestmark = pytest.mark.slow  # three lm-eval runs at once and a server: 1-2 minutes on 2 CPU cores

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
EOS = 256  # tiny-random's <|endoftext|>, made likely in the model of eos_dir (conftest.py)
CONTEXT = 1024  # the tiny model's n_positions

# --model_args of the runs through the server and of the hf run: each setting there so that they
# compute the same thing.
SERVER_ARGS = {
    # lm-eval's API models keep one token of max_length for the token the server generates after
    # an echoed prompt: they send at most max_length - 1 = 1023 prompt tokens (1023 + 1 fit the
    # context; 1024 + 1 would be a 400), and score rolling windows of max_length - 2 = 1022 tokens.
    "max_length": CONTEXT,
    # lm-eval tokenizes (with the model's tokenizer files, or through the server: SERVED below) and
    # sends token ids: `ctxlen`, which indexes the server's echoed tokens, counts the very tokens
    # the server scores.
    "tokenizer_backend": "huggingface",
    "tokenized_requests": True,
    # one request at a time (lm-eval's synchronous code path); the "auto" run below sends four at
    # once (its asynchronous path: the server batches them, and its results must not change)
    "num_concurrent": 1,
    "max_retries": 1,  # a refused request fails the run at once instead of after back-offs
}
HF_ARGS = {
    # hf scores rolling windows of max_length tokens and feeds at most max_length tokens (the last
    # token of an item is only scored): 1022, the windows and the truncation of the runs above.
    "max_length": CONTEXT - 2,
    "dtype": "float32",  # the server's precision (hf's "auto" is float32 for these weights, too)
}
# --batch_size 1 for every run: one prompt per request to the server, and no padding in hf's
# batches, so each item is computed on its own, as the server computes it.


def _greedy_tokens(model, sequences: list[list[int]]) -> list[list[int]]:
    """The model's greedy next token at every position of each sequence (one padded batch)."""
    width = max(map(len, sequences))
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        best = model(ids, attention_mask=mask).logits.argmax(-1)
    return [best[i, : len(s)].tolist() for i, s in enumerate(sequences)]


def find_eos_items(model_dir: Path) -> list[dict]:
    """Loglikelihood items for this model after which its greedy next token is end-of-text, so the
    token the server generates after the echoed item is end-of-text: a server that left that token
    out of its response would have lm-eval's `token_logprobs[ctxlen:-1]` drop the continuation's
    last token instead.

    Random word sequences are continued greedily; where end-of-text comes within a few tokens, the
    tokens before it are a greedy continuation followed by end-of-text. Each gives an item with
    that continuation (greedy), one with the continuation and "<|endoftext|>" (greedy, ending in
    end-of-text), and items with the continuation after the others' contexts where end-of-text
    still follows it (not greedy there). Each item says whether its continuation is greedy and
    whether end-of-text follows, as computed here with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc_cli.models.tiny import WORDS

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(0)
    contexts = list(dict.fromkeys(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))).capitalize() for _ in range(384)))
    encoded = [tok(c).input_ids for c in contexts]
    grown = [list(ids) for ids in encoded]
    for _ in range(5):
        for seq, greedy in zip(grown, _greedy_tokens(model, grown)):
            seq.append(greedy[-1])
    found: dict[str, str] = {}  # continuation -> the first context it follows
    for context, ids, seq in zip(contexts, encoded, grown):
        cont = seq[len(ids) :]
        if EOS in cont[1:]:
            cont = cont[: cont.index(EOS)]
            text = tok.decode(cont)
            if tok(context + text).input_ids == ids + cont:  # lm-eval's split of context + continuation
                found.setdefault(text, context)
    assert len(found) >= 3, f"too few continuations followed by end-of-text: {found}"
    picked = list(found.items())[:4]
    pairs = [(context, text + end) for text, context in picked for end in ("", "<|endoftext|>")]
    pairs += [(other, text) for text, context in picked for _, other in picked if other != context]
    sequences = [tok(context + cont).input_ids for context, cont in pairs]
    items = []
    for (context, cont), seq, greedy in zip(pairs, sequences, _greedy_tokens(model, sequences)):
        start = len(tok(context).input_ids)
        item = {"context": context, "continuation": cont, "greedy": greedy[start - 1 : -1] == seq[start:], "eos_next": greedy[-1] == EOS}
        if item["eos_next"] or cont.endswith("<|endoftext|>"):
            items.append(item)
    return items


def _task_dir(tmp: Path, eos_items: list[dict]) -> Path:
    """The task YAMLs with their data files as absolute paths; the loglikelihood data with the
    end-of-text items added."""
    out = tmp / "tasks"
    out.mkdir()
    data = (TASKS / "loglikelihood.jsonl").read_text(encoding="utf-8")
    data += "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in eos_items)
    (out / "loglikelihood.jsonl").write_text(data, encoding="utf-8")
    for yaml in TASKS.glob("*.yaml"):
        text = yaml.read_text(encoding="utf-8").replace("test: tests/lm_eval_tasks/", f"test: {TASKS}/")
        (out / yaml.name).write_text(text.replace(f"{TASKS}/loglikelihood.jsonl", str(out / "loglikelihood.jsonl")), encoding="utf-8")
    return out


def _lm_eval(model: str, args: dict, tasks: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1",  # a tiny model gains nothing from threads that fight the others for 2 cores
           "OPENAI_API_KEY": KEY}  # what local-completions sends as its bearer token
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--batch_size", "1", *extra,
           "--tasks", "aigc_parity", "--include_path", str(tasks), "--log_samples", "--output_path", str(out)]
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


@dataclass
class Runs:
    outputs: dict[str, Path]  # run -> its --output_path
    eos_items: list[dict]

    def samples(self, run: str, task: str) -> dict[int, dict]:
        (path,) = self.outputs[run].rglob(f"samples_{task}_*.jsonl")
        return {r["doc_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


# The runs through the server: lm-eval tokenizing with the model's tokenizer files, and with its
# default tokenizer_backend "auto", which finds aigc's vLLM-style /tokenizer_info and /tokenize
# and tokenizes through the server (that run also sends four requests at a time).
SERVED = ("huggingface", "auto")


@pytest.fixture(scope="module")
def runs(eos_dir, tmp_path_factory) -> Runs:
    """lm-eval's hf run and its runs through `aigc serve --api-key` on the same model directory,
    all at once (the hf run computes while the others wait for the server)."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    eos_items = find_eos_items(eos_dir)
    tasks = _task_dir(tmp, eos_items)
    server = Server(tmp, model=str(eos_dir))
    procs: dict[str, subprocess.Popen] = {}
    try:
        api = {"model": str(eos_dir), "base_url": server.url + "/v1/completions", **SERVER_ARGS}
        procs["hf"] = _lm_eval("hf", {"pretrained": str(eos_dir), **HF_ARGS}, tasks, tmp / "hf", "--device", "cpu")
        procs["huggingface"] = _lm_eval("local-completions", {**api, "tokenizer": str(eos_dir)}, tasks, tmp / "huggingface")
        # the tokenizer endpoints take the key as auth_token
        auto = {**api, "tokenizer_backend": "auto", "auth_token": KEY, "num_concurrent": 4}
        procs["auto"] = _lm_eval("local-completions", auto, tasks, tmp / "auto")
        for run, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (tmp / f"{run}.log").read_text()[-5000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # another run failed first
                proc.kill()
                proc.wait()
        code = server.stop()
    assert code == 0, server.log.read_text()
    return Runs({run: tmp / run for run in procs}, eos_items)


def _loglikelihoods(samples: dict[int, dict]) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc, choice) -> (log-likelihood, is_greedy); lm-eval writes both as strings."""
    return {(doc, n): (float(r[0][0]), r[0][1] == "True") for doc, s in samples.items() for n, r in enumerate(s["resps"])}


@pytest.mark.parametrize("run", SERVED)
@pytest.mark.parametrize("task", ["aigc_loglikelihood", "aigc_choice"])
def test_loglikelihoods_agree_item_by_item(runs, run, task):
    served, reference = _loglikelihoods(runs.samples(run, task)), _loglikelihoods(runs.samples("hf", task))
    assert served.keys() == reference.keys() and served
    worst = max(abs(served[k][0] - reference[k][0]) for k in served)
    assert worst <= 1e-4, {k: (served[k], reference[k]) for k in served if abs(served[k][0] - reference[k][0]) > 1e-4}
    assert {k: v[1] for k, v in served.items()} == {k: v[1] for k, v in reference.items()}
    print(f"{run} {task}: {len(served)} loglikelihoods, largest difference {worst:.2g} nats")


@pytest.mark.parametrize("run", SERVED)
def test_the_items_followed_by_end_of_text_are_there_and_agree(runs, run):
    """The items that catch a server which leaves a generated end-of-text out of its response (the
    last token of each continuation would go missing): found for this model, and scored alike."""
    eos_items = runs.eos_items
    assert sum(x["eos_next"] and x["greedy"] for x in eos_items) >= 3
    assert sum(x["eos_next"] and not x["greedy"] for x in eos_items) >= 2
    assert sum(x["continuation"].endswith("<|endoftext|>") for x in eos_items) >= 3
    served, reference = runs.samples(run, "aigc_loglikelihood"), runs.samples("hf", "aigc_loglikelihood")
    by_item = {(s["doc"]["context"], s["doc"]["continuation"]): doc for doc, s in served.items()}
    for item in eos_items:
        doc = by_item[item["context"], item["continuation"]]
        (((ll, greedy),),) = served[doc]["resps"]
        (((ref_ll, ref_greedy),),) = reference[doc]["resps"]
        assert abs(float(ll) - float(ref_ll)) <= 1e-4 and greedy == ref_greedy == str(item["greedy"]), (item, ll, ref_ll)


@pytest.mark.parametrize("run", SERVED)
def test_rolling_loglikelihoods_agree_per_token(runs, run, eos_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(eos_dir)
    served, reference = runs.samples(run, "aigc_rolling"), runs.samples("hf", "aigc_rolling")
    assert served.keys() == reference.keys() and len(served) == 3
    worst = 0.0
    for doc, s in served.items():
        n = len(tok(s["doc"]["text"]).input_ids)
        assert 1500 <= n <= 2500, n  # two or three windows
        per_token = abs(float(s["resps"][0][0]) - float(reference[doc]["resps"][0][0])) / n
        worst = max(worst, per_token)
        assert per_token <= 1e-6, (doc, s["resps"], reference[doc]["resps"], n)
    print(f"{run} aigc_rolling: largest difference {worst:.2g} nats per token")


@pytest.mark.parametrize("run", SERVED)
def test_greedy_generations_are_identical(runs, run):
    served, reference = runs.samples(run, "aigc_generate"), runs.samples("hf", "aigc_generate")
    assert served.keys() == reference.keys() and len(served) == 10
    texts = {doc: s["resps"][0][0] for doc, s in served.items()}
    assert texts == {doc: s["resps"][0][0] for doc, s in reference.items()}
    assert "" in texts.values()  # end-of-text at once
