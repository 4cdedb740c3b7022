"""aigc finetune on the tiny model: the loss is transformers' loss, a tiny corpus is memorised, the
result loads everywhere, checkpoints resume to the same weights after kill -9 and Ctrl-C, and bad
input is refused with a one-line error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CORPUS = (
    "The sea is calm tonight. The tide is full, the moon lies fair upon the straits; on the French coast "
    "the light gleams and is gone.\n"
)
TRAIN = ["--model", "tiny-random", "--block-size", "32", "--batch-size", "4", "--lr", "3e-3", "--seed", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(CORPUS * 30)
    return path


def _aigc(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc_cli", *args], capture_output=True, text=True, timeout=300, **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("chunk", [256, 4])  # the head in one chunk, and in four (the gradient buffer written, then added to)
def test_the_loss_is_transformers_loss_and_so_is_its_gradient(tiny_lm, monkeypatch, chunk):
    from aigc_cli.apps import finetune
    from aigc_cli.apps.finetune import collate, lm_loss

    monkeypatch.setattr(finetune, "_HEAD_CHUNK", chunk)
    torch.manual_seed(0)
    model = tiny_lm.hf_model.__class__(tiny_lm.hf_model.config)
    model.load_state_dict(tiny_lm.hf_model.state_dict())
    model.eval()  # no dropout: the two passes must see the same network
    batch = [[5, 9, 13, 200, 31, 7], [44, 3, 250], [8, 8, 8, 8, 8, 8, 8, 8]]
    ids, mask = collate(batch, pad=0, device="cpu")
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = lm_loss(model, ids, mask, backward=True, scale=1 / 14)  # the step's mean, as training asks
    assert count == 5 + 2 + 7
    assert total / count == pytest.approx(float(ref.detach()), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6), n


def test_the_fused_activation_computes_the_same_function(tiny_lm):
    from transformers.activations import NewGELUActivation

    from aigc_cli.apps.finetune import _fuse_activations

    model = tiny_lm.hf_model.__class__(tiny_lm.hf_model.config).eval()
    model.load_state_dict(tiny_lm.hf_model.state_dict())
    ids = torch.tensor([[5, 9, 13, 200, 31, 7, 99, 120]])
    before = model(ids).logits
    assert any(isinstance(m, NewGELUActivation) for m in model.modules())
    _fuse_activations(model)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert torch.allclose(model(ids).logits, before, atol=1e-5)  # eval mode: the dropouts stay off


def test_the_faster_dropout_drops_p_of_the_values_and_scales_the_rest():
    from aigc_cli.apps.finetune import _Dropout

    x = torch.ones(400_000, requires_grad=True)
    drop = _Dropout(0.1).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    assert not torch.equal(drop(x), y)  # a fresh mask each call
    assert torch.equal(drop.eval()(x), x)


def test_a_tiny_corpus_is_memorised_and_the_result_loads_everywhere(corpus, tmp_path, cli):
    out = tmp_path / "model"
    r = _aigc("finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "150", "--save-every", "0")
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    ppl = [x["val_perplexity"] for x in log if "val_perplexity" in x]
    assert len(ppl) == 2 and ppl[1] < ppl[0] / 100  # before and after
    steps = [x for x in log if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 151)) and steps[-1]["loss"] < steps[0]["loss"] / 10
    assert all({"lr", "tokens_per_s"} <= set(x) for x in steps)
    assert not (out / "checkpoint").exists() and not (out / ".aigc-finetune.lock").exists()

    prefix = "The sea is calm tonight. The tide"
    (rec,) = cli.jsonl("generate", prefix, "--model", str(out), "--temperature", "0", "--max-new-tokens", "20")
    assert (prefix + rec["text"])[:60] == CORPUS[:60], rec["text"]  # the corpus, continued word for word
    s = cli("score", "-", "--model", str(out), "--format", "jsonl", input=CORPUS)
    assert s.exit_code == 0 and json.loads(s.stdout)["perplexity"] < 3
    p = cli("poem", "the sea", "--form", "haiku", "--seed", "3", "--model", str(out), "--format", "jsonl")
    assert p.exit_code == 0, p.stderr
    poem = tmp_path / "poem.txt"
    poem.write_text(json.loads(p.stdout)["text"])
    assert cli("poem", "--check", str(poem), "--form", "haiku").exit_code == 0  # the form holds on the tuned model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.n_positions == 1024 and tok.eos_token_id is not None


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "model"
    r = _aigc("finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "120", "--save-every", "7")
    assert r.returncode == 0, r.stderr
    return _weights(out)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_resume_after_an_interruption_ends_with_the_same_weights(corpus, tmp_path, uninterrupted, how):
    out = tmp_path / "model"
    args = ["finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "120", "--save-every", "7"]
    proc = subprocess.Popen([sys.executable, "-m", "aigc_cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.005)
    # at once: the rest of the 120 steps can take well under 50 ms on a fast machine
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if how == "Ctrl-C":
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists(), "the run finished before it was interrupted"
    r = _aigc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert _same(_weights(out), uninterrupted)
    steps = [json.loads(x)["step"] for x in (out / "training_log.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, 121))  # no step logged twice or missing


@pytest.mark.parametrize("where", ["optimizer step", "log line"])
def test_an_interruption_cannot_split_a_step_from_its_log_line(cli, corpus, tmp_path, uninterrupted, monkeypatch, where):
    """Ctrl-C at the worst moments, on purpose: inside the optimizer's update (weights half
    changed, the step not counted) and between a counted step and its log line. The step finishes
    and is logged, then the run stops; the resumed run ends where an uninterrupted one does."""
    from aigc_cli.apps import finetune

    out = tmp_path / "model"
    args = ["finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "120", "--save-every", "7"]
    real_log, real_adamw = finetune.Trainer._log, torch.optim.AdamW.step

    def log(self, record):
        if where == "log line" and record.get("step") == 16 and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)
        real_log(self, record)

    def step(self, *a, **kw):
        result = real_adamw(self, *a, **kw)
        if where == "optimizer step" and finetune_state["trainer"].state.step == 15:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    finetune_state = {}
    real_init = finetune.Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        finetune_state["trainer"] = self

    monkeypatch.setattr(finetune.Trainer, "_log", log)
    monkeypatch.setattr(finetune.Trainer, "__init__", init)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    r = cli(*args)
    assert r.exit_code == 130 and "interrupted at step 16" in r.stderr, r.stderr
    monkeypatch.undo()
    r = _aigc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x)["step"] for x in (out / "training_log.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, 121))
    assert _same(_weights(out), uninterrupted)


def test_resume_refuses_other_settings_or_data(corpus, tmp_path):
    out = tmp_path / "model"
    args = ["finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "30", "--save-every", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "aigc_cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    if (out / "model.safetensors").exists():
        pytest.skip("the run finished before it could be interrupted")
    r = _aigc(*[a if a != "3e-3" else "1e-3" for a in args], "--resume")
    assert r.returncode == 2 and "--lr" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other.txt"
    other.write_text(CORPUS * 29)
    r = _aigc(*[str(other) if a == str(corpus) else a for a in args], "--resume")
    assert r.returncode == 2 and "data differs" in r.stderr


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (lambda d: (d / "in.txt").write_text("   \n\n"), [], "no text"),
        (lambda d: (d / "in.txt").write_bytes(b"abc\x00\x01def"), [], "binary"),
        (lambda d: (d / "in.txt").write_bytes(b"caf\xe9"), [], "UTF-8"),
        (lambda d: (d / "in.txt").write_text(CORPUS), ["--block-size", "5000"], "context"),
        (lambda d: (d / "in.txt").write_text(CORPUS), ["--lr", "nan"], "--lr"),
        (lambda d: ((d / "in.txt").write_text(CORPUS), (d / "out").mkdir(), (d / "out" / "config.json").write_text("{}")), [], "--overwrite"),
        (lambda d: (d / "in.txt").write_text(CORPUS), ["--resume"], "no checkpoint"),
        (lambda d: ((d / "in.txt").write_text(CORPUS), (d / "in.jsonl").write_text("not json\n")), ["--val", "IN.jsonl"], "line 1"),
        (lambda d: (d / "in.txt").write_text(CORPUS), ["--sample-every", "1", "--sample-prompt", "the sea " * 600], "--sample-prompt"),
    ],
    ids=["empty", "binary", "not-utf8", "block-size", "lr", "holds-a-model", "resume-nothing", "bad-jsonl", "sample-prompt"],
)
def test_bad_input_is_refused_in_one_line(cli, tmp_path, setup, extra, message):
    setup(tmp_path)
    extra = [str(tmp_path / "in.jsonl") if a == "IN.jsonl" else a for a in extra]
    r = cli("finetune", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out"), "--model", "tiny-random", "--steps", "1", *extra)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_output_is_refused(cli, tmp_path, corpus):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    r = cli("finetune", str(corpus), "-o", str(locked / "model"), "--model", "tiny-random", "--steps", "1")
    assert r.exit_code == 2 and "cannot write" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_on_a_gpu_uses_bf16_autocast(corpus, tmp_path):
    r = _aigc("finetune", str(corpus), "-o", str(tmp_path / "m"), *TRAIN, "--steps", "5", "--device", "cuda")
    assert r.returncode == 0, r.stderr


# -- the default block on a 1024-token context --------------------------------------------------


def test_the_default_block_fits_a_1024_context_in_training_and_in_evaluation(cli, tmp_path, monkeypatch):
    """No --block-size on tiny-random (1024 positions) with documents longer than a block: the
    blocks are 1024 ids, and the held-out perplexity (BOS + 1024 ids) slides windows of 1024."""
    from aigc_cli.models import loading

    widths: list[int] = []
    real = loading.load_trainable

    def load(*a, **kw):
        model, tokenizer, context = real(*a, **kw)
        model.transformer.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        return model, tokenizer, context

    monkeypatch.setattr(loading, "load_trainable", load)
    words = "the sea is calm tonight tide full moon lies fair upon straits French coast light gleams gone".split()
    corpus = tmp_path / "long.txt"
    corpus.write_text("".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(120)) + ".\n" for i in range(200)))
    out = tmp_path / "model"
    r = cli("finetune", str(corpus), "-o", str(out), "--model", "tiny-random", "--steps", "1", "--batch-size", "2", "--save-every", "0")
    assert r.exit_code == 0, r.stderr
    assert "up to 1024 tokens" in r.stderr
    assert max(widths) == 1024  # training blocks and evaluation windows fill the context, and no more
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert len([x for x in log if "val_perplexity" in x]) == 2


# -- one run per output directory ------------------------------------------------------------------


def test_a_second_run_on_the_same_directory_is_refused_before_it_touches_anything(cli, corpus, tmp_path):
    out = tmp_path / "model"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(b"the first run's checkpoint")
    (out / "training_log.jsonl").write_text('{"step": 1}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from aigc_cli.apps.finetune import OutputLock\n"
         "with OutputLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # as a running aigc finetune holds it
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        r = cli("finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "3")
        assert r.exit_code == 2, r.stderr
        assert f"pid {holder.pid}" in r.stderr and str(out) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
    r = cli("finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "3")  # the lock went with its holder
    assert r.exit_code == 0, r.stderr
    assert not (out / ".aigc-finetune.lock").exists()


# -- streamed data -------------------------------------------------------------------------------


def _mixed_corpus(d: Path) -> list[str]:
    """Files across every seam of reading a chunk at a time: a BOM and CRLF line breaks, JSONL with
    an empty record, multi-byte characters, blank-line paragraphs, tabs, runs of spaces, a long word."""
    (d / "a.txt").write_bytes(("\ufeff" + CORPUS.replace("\n", "\r\n") * 12).encode())
    records = ["café au lait, s'il vous plaît", "", "Zeile eins\nZeile zwei\n\nnach der Lücke 中文", "  spaced   out  "]
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n\n" for t in records))
    verse = "Ah, love, let us be true\nTo one another!  for the world, which seems\n\n\nTo lie before us, 12345 ...\t tabs\n"
    (d / "c.txt").write_text(verse * 40 + "x" * 300 + " end\n")
    return [str(d / name) for name in ("a.txt", "b.jsonl", "c.txt")]


def _main_data(paths: list[str], tokenizer, block: int, line_by_line: bool, val_split: float, seed: int):
    """main's data path (196919b) in brief: each file read and decoded whole, one tokenizer call per
    document, examples as Python lists; the held-out split and each epoch's batches as it drew them."""
    docs: list[str] = []
    for p in paths:
        text = Path(p).read_bytes().decode("utf-8").removeprefix("\ufeff")
        if p.endswith(".jsonl"):
            docs.extend(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        elif text.strip():
            docs.append(text)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if line_by_line:
        examples = [ids[:block] for ids in (encode(x) for d in docs for x in d.splitlines() if x.strip()) if ids]
    else:
        stream = [t for d in docs for t in encode(d) + [tokenizer.eos_token_id]]
        examples = [stream] if len(stream) < block else [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[: max(1, round(val_split * len(examples)))])
    train = [e for i, e in enumerate(examples) if i not in held]

    def batches(epoch: int) -> list[list[list[int]]]:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        return [[train[i] for i in order[k : k + 4]] for k in range(0, len(order), 4)]

    return train, [e for i, e in enumerate(examples) if i in held], batches


@pytest.fixture
def small_reads(monkeypatch):
    """Reads of 5 bytes (a character or a CRLF split between two), tokenizer calls of about 40
    characters, batches of 300: every seam is crossed many times on a small corpus."""
    from aigc_cli.apps import finetune

    monkeypatch.setattr(finetune, "_READ", 5)
    monkeypatch.setattr(finetune, "_PIECE", 40)
    monkeypatch.setattr(finetune, "_BATCH", 300)


def _tokenizer(name: str):
    """tiny-random's tokenizer, or ("gpt2-like") one whose merges join runs of white space as
    GPT-2's do ("\n\n" is one token, so a text cut after "\n\n" is not encoded as the whole)."""
    from transformers import GPT2Tokenizer

    from aigc_cli.models.tiny import english_vocab, hf_tokenizer

    if name == "tiny-random":
        return hf_tokenizer(name)
    vocab, merges, _ = english_vocab()
    for pair in [("Ċ", "Ċ"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ġ", "Ċ"), ("č", "Ċ"), ("1", "2"), ("12", "3")]:
        merges.append(pair)
        vocab[pair[0] + pair[1]] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=merges)


class _Measured:
    """A tokenizer that keeps the longest text, and the most text, that one call was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest, self.most = tokenizer, 0, 0

    def __call__(self, texts, **kw):
        self.longest = max(self.longest, *map(len, texts))
        self.most = max(self.most, sum(map(len, texts)))
        return self.tokenizer(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("tokenizer", ["tiny-random", "gpt2-like"])
@pytest.mark.parametrize("line_by_line", [False, True], ids=["packed", "line-by-line"])
def test_streamed_examples_split_and_batches_are_mains(tmp_path, small_reads, line_by_line, tokenizer):
    """The same examples, held-out split and batches as main's whole-file reading, from text
    encoded a batch of pieces at a time (reads of 5 bytes, pieces of 40 characters)."""
    from aigc_cli.apps.finetune import batches, scan_data, split_validation, tokenize

    paths = _mixed_corpus(tmp_path)
    tokenizer = _tokenizer(tokenizer)
    train, val, main_batches = _main_data(paths, tokenizer, 48, line_by_line, 0.1, 3)
    measured = _Measured(tokenizer)
    examples = tokenize(measured, scan_data(paths, tmp_path).documents(), 48, line_by_line)
    assert measured.longest <= 40 + 310 and measured.most <= 300 + 350  # a piece (or the 300-character word), a batch
    assert examples.ids.dtype == torch.int32
    held_in, held_out = split_validation(len(examples), 0.1, 3)
    ours = examples.subset(held_in)
    assert [ours[i].tolist() for i in range(len(ours))] == train
    assert [examples.subset(held_out)[i].tolist() for i in range(len(held_out))] == val
    for epoch in (0, 1):
        assert [[ours[int(i)].tolist() for i in b] for b in batches(len(ours), 4, 3, epoch)] == main_batches(epoch)


# main's (196919b) losses at steps 1-12 and validation perplexities (steps 0, 4, 8, 12) on _mixed_corpus
# with --block-size 48 --batch-size 4 --lr 3e-3 --seed 3 --val-split 0.1 --eval-every 4
MAIN_RUNS = {
    "packed": (
        [7.903953, 5.652215, 4.325131, 5.58436, 3.774933, 3.373102, 3.411576, 1.753586, 3.687919, 1.949629, 2.668468, 2.170538],
        [2757.832, 95.8917, 32.9407, 22.6893],
    ),
    "line-by-line": (
        [7.566163, 6.66892, 3.968064, 6.678921, 3.175062, 2.581095, 1.816926, 1.572452, 1.367456, 1.202177, 1.06821, 3.752022],
        [3104.0834, 54.7391, 16.7423, 13.2318],
    ),
}


@pytest.mark.parametrize("mode", MAIN_RUNS)
def test_training_on_streamed_data_follows_mains_losses(cli, tmp_path, small_reads, mode):
    out = tmp_path / "model"
    args = ["--model", "tiny-random", "--block-size", "48", "--batch-size", "4", "--lr", "3e-3", "--seed", "3", "--steps", "12"]
    extra = ["--line-by-line"] if mode == "line-by-line" else []
    r = cli("finetune", *_mixed_corpus(tmp_path), "-o", str(out), *args, "--val-split", "0.1", "--eval-every", "4", *extra)
    assert r.exit_code == 0, r.stderr
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    losses, perplexities = MAIN_RUNS[mode]
    assert [x["loss"] for x in log if "loss" in x] == pytest.approx(losses, rel=1e-4)
    assert [x["val_perplexity"] for x in log if "val_perplexity" in x] == pytest.approx(perplexities, rel=1e-4)


def test_stdin_is_spooled_and_read_as_a_file_is(tmp_path, corpus):
    import io

    from aigc_cli.apps.finetune import scan_data, tokenize
    from aigc_cli.models.tiny import hf_tokenizer

    tokenizer = hf_tokenizer("tiny-random")
    piped = scan_data(["-"], tmp_path, stdin=io.BytesIO(corpus.read_bytes()))
    named = scan_data([str(corpus)], tmp_path)
    assert piped.digest == named.digest
    a, b = (tokenize(tokenizer, c.documents(), 32, False) for c in (piped, named))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.starts, b.starts)
    assert list(tmp_path.iterdir()) == []  # the spool has no name


def test_a_file_that_changes_between_its_check_and_its_tokenization_is_refused(tmp_path):
    from aigc_cli.apps.finetune import scan_data
    from aigc_cli.core.errors import UsageError

    path = tmp_path / "growing.txt"
    path.write_text(CORPUS)
    corpus = scan_data([str(path)], tmp_path)
    path.write_text(CORPUS + "more")
    with pytest.raises(UsageError, match="growing.txt: changed"):
        for doc in corpus.documents():
            list(doc)


# -- a full disk -------------------------------------------------------------------------------


def _one_error(stderr: str) -> str:
    """The error line, which must be the only one and the last (info lines come before it)."""
    lines = stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("aigc: error")] == lines[-1:] and "Traceback" not in stderr, stderr
    return lines[-1]


def _no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".staging" in p.parts]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_resume_continues(cli, corpus, tmp_path, uninterrupted, monkeypatch):
    """The second checkpoint (step 14) fails part-way with ENOSPC: one line naming the file, the
    space needed and free, and the checkpoint of step 7, kept whole; --resume ends as an
    uninterrupted run does."""
    import errno

    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 5000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "model"
    args = ["finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "120", "--save-every", "7"]
    r = cli(*args)
    state = out / "checkpoint" / "state.pt"
    assert r.exit_code == 1, r.stderr
    error = _one_error(r.stderr)
    assert f"{state}: no space left on device (needs about 4.5 MB, " in error and " free)" in error, error
    assert f"last good checkpoint (step 7) is kept in {state}" in error and "--resume" in error, error
    assert _no_temp_files(out)
    assert torch.load(state, weights_only=False)["state"]["step"] == 7
    monkeypatch.undo()
    r = _aigc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert _same(_weights(out), uninterrupted)


def test_a_full_disk_at_the_final_save_loses_no_step(cli, corpus, tmp_path, uninterrupted, monkeypatch):
    """--save-every 0, and the model's weights fail part-way (safetensors reports the OS error in
    its message): the last step's checkpoint, written first, is where --resume continues."""
    from transformers import modeling_utils

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 5000)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    out = tmp_path / "model"
    args = ["finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "120", "--save-every", "0"]
    r = cli(*args)
    assert r.exit_code == 1, r.stderr
    error = _one_error(r.stderr)
    assert f"{out / 'model.safetensors'}: no space left on device (needs about 1.5 MB, " in error, error
    assert f"last good checkpoint (step 120) is kept in {out / 'checkpoint' / 'state.pt'}" in error, error
    assert _no_temp_files(out) and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    r = _aigc(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert _same(_weights(out), uninterrupted) and not (out / "checkpoint").exists()
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == list(range(1, 121))
    assert [x["step"] for x in log if "val_perplexity" in x] == [0, 120]  # "after" logged once


def test_a_write_that_torch_reports_as_enforce_fail_names_the_file_and_cause(corpus, tmp_path):
    """A real failed write (a file-size limit of 2 MB, under the checkpoint's 4.5 MB): torch.save's
    "enforce fail at inline_container.cc" becomes one line with the cause; no temporary file."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "model"
    r = subprocess.run(
        [sys.executable, "-m", "aigc_cli", "finetune", str(corpus), "-o", str(out), *TRAIN, "--steps", "10", "--save-every", "5"],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )
    assert r.returncode == 1, r.stderr
    error = _one_error(r.stderr)
    assert f"{out / 'checkpoint' / 'state.pt'}: cannot write (File too large; needs about 4.5 MB, " in error, error
    assert error.endswith("there is no checkpoint to resume from") and _no_temp_files(out)
