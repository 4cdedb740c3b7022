"""aigc finetune: adapt a causal LM to your own text, with checkpoints that resume exactly, and a
standard model directory out (config, safetensors weights, tokenizer, generation config).

Data: text files packed into blocks of `block_size` tokens with EOS between documents (as
transformers' run_clm.py does), or one example per line (`line_by_line`); JSONL files give their
`text` fields. Training runs transformers' model; the LM head and its cross-entropy run a chunk of
positions at a time, backward included, so the (batch x block x vocabulary) logits are never held
whole (GPT-2: 206 MB per 4 x 256 batch, twice over with their gradient).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aigc_cli.core import jsondata
from aigc_cli.core.textrules import TOKEN_CUTS
from aigc_cli.jobs.textfiles import Problems
from aigc_cli.models.conventions import document_frame
from aigc_cli.core.errors import OutputError, UsageError
from aigc_cli.jobs.outfile import _lock_holder

CHECKPOINT = "checkpoint"  # DIR/checkpoint/state.pt
LOG = "training_log.jsonl"
LOCK = ".aigc-finetune.lock"  # held (flock) by the run writing DIR
# Positions per LM-head chunk in the loss: 256 x 50,257 float32 logits are 51 MB. Measured on 2
# cores, GPT-2 small, 4 x 256 blocks, seconds per step: chunks of 256 4.9, 512 5.5, 1024 5.5.
_HEAD_CHUNK = 256
_SAMPLE_TOKENS = 40  # new tokens per sample (--sample-every)


@dataclass(frozen=True)
class TrainSettings:
    """What decides the trained weights (with the data and the base model); checked on --resume."""

    model: str = "gpt2"
    steps: int | None = None  # optimizer steps; None: from epochs
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int | None = None  # None: the model's context, at most 1024
    line_by_line: bool = False
    val_split: float = 0.05
    val_file: str | None = None
    seed: int = 0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def check(self) -> None:
        def bad(flag: str, text: str) -> UsageError:
            return UsageError(f"--{flag}: {text}")

        if self.steps is not None and self.steps < 1:
            raise bad("steps", f"must be at least 1 (got {self.steps})")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise bad("epochs", f"must be above 0 (got {self.epochs})")
        if not (0 < self.lr < 1 and math.isfinite(self.lr)):
            raise bad("lr", f"must be in (0, 1) (got {self.lr})")
        if not 1 <= self.batch_size <= 4096:
            raise bad("batch-size", f"must be from 1 to 4096 (got {self.batch_size})")
        if not 1 <= self.grad_accum <= 4096:
            raise bad("grad-accum", f"must be from 1 to 4096 (got {self.grad_accum})")
        if self.block_size is not None and self.block_size < 2:
            raise bad("block-size", f"must be at least 2 (got {self.block_size})")
        if not 0 <= self.val_split < 1:
            raise bad("val-split", f"must be in [0, 1) (got {self.val_split})")
        if self.warmup_steps < 0:
            raise bad("warmup-steps", f"must be 0 or more (got {self.warmup_steps})")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise bad("weight-decay", f"must be 0 or more (got {self.weight_decay})")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise bad("max-grad-norm", f"must be above 0 (got {self.max_grad_norm})")


@dataclass
class Schedule:
    """How often to evaluate, sample and save; changing these does not change the weights."""

    eval_every: int = 0  # 0: before and after only
    sample_every: int = 0
    sample_prompt: str = ""
    save_every: int = 100


# -- data ----------------------------------------------------------------------------------------

_READ = 1 << 20  # bytes per read of a data file
_PIECE = 1 << 16  # characters per tokenizer call (its working memory is ~100 bytes per character)
_BATCH = 1 << 20  # characters per batch of tokenizer calls (a fast tokenizer runs a batch in parallel)
_STUCK = 1 << 20  # characters with no cut in _CUTS after which a piece is cut anyway (not prose)
_CUTS = TOKEN_CUTS


@dataclass
class Source:
    """One data file, as `scan_data` found it."""

    name: str  # as the user named it ("stdin" for '-')
    path: str
    jsonl: bool
    spool: Any = None  # stdin or a pipe, copied to an unnamed temporary file to be read again
    sha: str = ""  # of its bytes at the first reading; a later reading must find the same
    size: int = 0
    has_text: bool = False  # a text file of only white space is no document

    def open(self) -> Any:
        """Its bytes from the start, as a binary file in a `with`."""
        if self.spool is None:
            return open(self.path, "rb")
        self.spool.seek(0)
        return contextlib.nullcontext(self.spool)


@dataclass
class Corpus:
    """Data files, checked and hashed by `scan_data` without keeping their text; `documents()`
    reads them again, a chunk at a time."""

    sources: list[Source]
    digest: str  # of every file's length and bytes, to recognise the same data on --resume
    size: int  # bytes

    def documents(self) -> Iterator[Iterable[str]]:
        """Each document as its text in chunks, to be read through before the next: a text file,
        or a JSONL record's "text". UsageError if a file changed since `scan_data` read it."""
        for src in self.sources:
            if src.jsonl and src.has_text:
                yield from ((text,) for text in _records(src))
            elif src.has_text:
                yield _decoded(src)


def scan_data(paths: Sequence[str], spool_dir: Path, stdin: Any = None, problems: Problems | None = None) -> Corpus:
    """Text files, JSONL files (their "text" fields) or '-' (stdin), read through once a chunk at a
    time and hashed. A bad item is reported to `problems` (file, line, reason) and left out, the
    rest goes on: a JSONL record without a string "text", or a text file (one document) that is
    not UTF-8 text without NUL bytes; UsageError when no text is left. Stdin and pipes are copied
    to an unnamed temporary file in `spool_dir`, to be read again when tokenizing."""
    digest = hashlib.sha256()
    sources, any_text = [], False
    for path in paths:
        src = _source(path, spool_dir, stdin)
        try:
            texts = _records(src, digest, problems) if src.jsonl else _decoded(src, digest)
            for text in texts:
                src.has_text = src.has_text or bool(text) and not text.isspace()
        except _BadDocument as exc:
            if problems is None:
                raise UsageError(str(exc)) from None
            problems.add(None, f"{str(exc).removeprefix(src.name + ': ')} (the file is left out)", src.name)
            src.has_text = False
            _skip_rest(src, digest)
        any_text = any_text or src.has_text
        sources.append(src)
    if not any_text:
        raise UsageError(f"{', '.join(paths)}: no text to train on")
    return Corpus(sources, digest.hexdigest()[:16], sum(src.size for src in sources))


class _BadDocument(UsageError):
    """A text file that cannot be a document (binary, not UTF-8)."""


def _skip_rest(src: Source, digest: Any) -> None:
    """Hash a left-out file anyway (the data's digest covers every file named), and remember it."""
    sha = hashlib.sha256()
    with src.open() as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        while data := fh.read(_READ):
            sha.update(data)
            digest.update(data)
    src.sha, src.size, src.jsonl = sha.hexdigest(), size, False


def _source(path: str, spool_dir: Path, stdin: Any) -> Source:
    """The file `path` names; stdin, a pipe or a device is spooled (it cannot be read twice)."""
    name = "stdin" if path == "-" else path
    src = Source(name, path, path.endswith(".jsonl"))
    try:
        mode = os.stat(path).st_mode if path != "-" else 0
        if path == "-" or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            src.spool = tempfile.TemporaryFile(dir=spool_dir)
            with contextlib.nullcontext(stdin or sys.stdin.buffer) if path == "-" else open(path, "rb") as fh:
                shutil.copyfileobj(fh, src.spool, _READ)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the copy's fault, not the input's
            raise write_failure(spool_dir / f"(a copy of {name})", exc, None) or exc from None
        raise UsageError(f"{name}: cannot read ({exc.strerror})") from None
    return src


def _decoded(src: Source, digest: Any = None) -> Iterator[str]:
    """The text of a data file, a read at a time: NUL bytes and bad UTF-8 refused (naming the file
    and the byte), a BOM dropped. The first reading records the file's hash (and feeds its length
    and bytes to `digest`); a later one must find the same bytes."""
    sha, offset, start = hashlib.sha256(), 0, True
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with src.open() as fh:
            size = os.fstat(fh.fileno()).st_size
            if digest is not None:
                digest.update(size.to_bytes(8, "little"))
            while data := fh.read(_READ):
                sha.update(data)
                if digest is not None:
                    digest.update(data)
                if b"\x00" in data:
                    raise _BadDocument(f"{src.name}: binary data (a NUL byte at {offset + data.index(0)}), not text")
                text = _decode(decoder, data, offset, src.name)
                offset += len(data)
                if start and text:
                    text, start = text.removeprefix("\ufeff"), False
                if text:
                    yield text
            _decode(decoder, b"", offset, src.name)
    except OSError as exc:
        raise UsageError(f"{src.name}: cannot read ({exc.strerror})") from None
    if offset != size or src.sha not in ("", sha.hexdigest()):
        raise UsageError(f"{src.name}: changed while it was being read; run again once it is complete")
    src.sha, src.size = sha.hexdigest(), size


def _decode(decoder: Any, data: bytes, offset: int, name: str) -> str:
    """`data` (at byte `offset` of the file) decoded after what the decoder holds; b"": the end."""
    pending = len(decoder.getstate()[0])
    try:
        return str(decoder.decode(data, final=not data))
    except UnicodeDecodeError as exc:
        raise _BadDocument(f"{name}: not valid UTF-8 (byte {offset - pending + exc.start})") from None


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of a text given in chunks, without their line breaks, as `str.splitlines` splits
    the whole (a "\\r\\n" split between two chunks is one break)."""
    carry = ""
    for chunk in chunks:
        lines = (carry + chunk).splitlines(keepends=True)
        carry = lines.pop() if lines else ""  # perhaps not the whole line, or "\r" of "\r\n"
        for line in lines:
            yield line.splitlines()[0]
    if carry:
        yield carry.splitlines()[0]


def _records(src: Source, digest: Any = None, problems: Problems | None = None) -> Iterator[str]:
    """The "text" fields of a JSONL file's records, a line at a time; a record without a string
    "text" is left out (reported to `problems` on the first reading, which passes them)."""
    for number, line in enumerate(_lines(_decoded(src, digest)), start=1):
        if not line.strip():
            continue
        try:
            record = jsondata.loads(line)
            value = record["text"]
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, str):
            if problems is not None:
                problems.add(number, 'not a JSON object with a string "text" field (left out)', src.name)
            continue
        yield value


@dataclass(frozen=True)
class Examples:
    """Token-id examples as spans of one int32 tensor: example i is ids[starts[i] : starts[i] + lengths[i]]."""

    ids: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.starts[i])
        return self.ids[start : start + int(self.lengths[i])]

    def subset(self, index: torch.Tensor) -> Examples:
        return Examples(self.ids, self.starts[index], self.lengths[index])


def tokenize(tokenizer: Any, documents: Iterable[Iterable[str]], block: int, line_by_line: bool, room: int = 0) -> Examples:
    """Token-id examples: blocks of `block` ids packed across documents (EOS between them; a short
    corpus gives one shorter block), or one example per non-empty line, cut at `block`. Each
    document comes as chunks of text and is encoded a batch of pieces at a time (cut at _CUTS,
    where the tokenizer splits anyway: the ids are those of one call per document), so memory holds
    a batch and the ids at 4 bytes each, never the text. `room`: ids to reserve room for (the
    data's size in bytes is enough for byte-level BPE), so that the array need not grow by copies."""
    cut = _cuts_are_safe(tokenizer)
    ids = _Ids(room)
    if line_by_line:
        lengths = _line_examples(tokenizer, documents, block, cut, ids).long()
        return Examples(ids.done(), torch.cumsum(lengths, 0) - lengths, lengths)
    _packed(tokenizer, documents, cut, ids)
    n = ids.n
    if n < 2:
        return Examples(ids.done(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    if n < block:
        return Examples(ids.done(), torch.zeros(1, dtype=torch.long), torch.full((1,), n))
    count = n // block
    return Examples(ids.done()[: count * block], torch.arange(count) * block, torch.full((count,), block))


class _Ids:
    """A growing int32 array. Its room is reserved up front: pages not yet written take no memory
    (glibc maps blocks this large fresh), so the ids are never copied unless they outgrow it."""

    def __init__(self, room: int) -> None:
        self.buf = torch.empty(max(room, 1 << 16), dtype=torch.int32)
        self.n = 0

    def extend(self, ids: list[int]) -> None:
        end = self.n + len(ids)
        if end > self.buf.numel():
            grown = torch.empty(max(end, 2 * self.buf.numel()), dtype=torch.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : end] = torch.tensor(ids, dtype=torch.int32)
        self.n = end

    def done(self) -> torch.Tensor:
        return self.buf[: self.n]


def make_examples(tokenizer: Any, docs: Sequence[str], block: int, line_by_line: bool) -> list[list[int]]:
    """`tokenize` of documents held as strings, as lists of ids."""
    examples = tokenize(tokenizer, ((d,) for d in docs), block, line_by_line)
    return [examples[i].tolist() for i in range(len(examples))]


def _cuts_are_safe(tokenizer: Any) -> bool:
    """Whether text cut at _CUTS encodes to the ids of the whole with this tokenizer (byte-level BPE
    and WordPiece: yes; SentencePiece, which marks the start of every text it encodes: no)."""
    text = "It's 2024, isn't it?\nThe  sea, the\n\nsea;\tcalm\r\nand full.\nÉtait  ça\n 12345 end"
    whole = _encode(tokenizer, [text])[0]
    return sum(_encode(tokenizer, _CUTS.split(text)), []) == whole


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The ids of each text, in one call (a fast tokenizer encodes the batch in parallel)."""
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def _pieces(chunks: Iterable[str], cut: bool) -> Iterator[str]:
    """A document's text, given in chunks, in pieces of about _PIECE characters cut at _CUTS (or
    where they stand after _STUCK characters with none); without `cut`, in one piece."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        start = 0
        while cut and len(buf) - start > _PIECE:
            match = _CUTS.search(buf, start + _PIECE)
            if match is None and len(buf) - start <= _STUCK:
                break  # wait for more text
            end = match.start() if match else start + _PIECE
            yield buf[start:end]
            start = end
        buf = buf[start:]
    if buf:
        yield buf


def _batched(items: Iterable[str | None]) -> Iterator[list[str | None]]:
    """Consecutive items in lists of about _BATCH characters."""
    batch: list[str | None] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item or "")
        if size >= _BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _packed(tokenizer: Any, documents: Iterable[Iterable[str]], cut: bool, out: _Ids) -> None:
    """The ids of every document in its frame (GPT-2: followed by end-of-text; a BERT vocabulary:
    [CLS] ... [SEP]; models.conventions), into `out`."""
    head, tail = document_frame(tokenizer)

    def items() -> Iterator[str | None]:
        for doc in documents:
            yield _START
            yield from _pieces(doc, cut)
            yield None  # the end of a document

    for batch in _batched(items()):
        encoded = iter(_encode(tokenizer, [t for t in batch if t is not None and t is not _START]))
        flat: list[int] = []
        for item in batch:
            flat.extend(tail if item is None else head if item is _START else next(encoded))
        out.extend(flat)


_START = "\x00 start of a document"  # (a document never holds NUL: such files are left out)


def _line_examples(tokenizer: Any, documents: Iterable[Iterable[str]], block: int, cut: bool, out: _Ids) -> torch.Tensor:
    """The first `block` ids of each non-empty line, one after another, into `out`; their counts.
    A line longer than a piece is encoded a piece at a time until it has `block` ids."""
    lines = (line for doc in documents for line in _lines(doc) if line.strip())
    frame = document_frame(tokenizer)
    lengths = _Ids(0)
    for batch in _batched(lines):
        short = iter(_encode(tokenizer, [t for t in batch if t is not None and len(t) <= _PIECE]))
        flat: list[int] = []
        counts: list[int] = []
        for line in batch:
            assert line is not None
            ids = next(short) if len(line) <= _PIECE else _head_ids(tokenizer, line, block, cut)
            if ids:
                framed = (frame[0] + ids + frame[1] if frame[0] else ids)[:block]  # [CLS] line [SEP] for a BERT vocabulary
                flat.extend(framed)
                counts.append(len(framed))
        out.extend(flat)
        lengths.extend(counts)
    return lengths.done()


def _head_ids(tokenizer: Any, line: str, block: int, cut: bool) -> list[int]:
    """The first `block` ids of a long line (all of them when it has fewer)."""
    ids: list[int] = []
    for piece in _pieces((line,), cut):
        ids.extend(_encode(tokenizer, [piece])[0])
        if len(ids) >= block:
            break
    return ids[:block]


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of n examples, each in order: a seeded random `fraction` of
    them (at least one, when there are two or more) held out."""
    if fraction == 0 or n < 2:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(n, dtype=torch.bool)
    held[order[: max(1, round(fraction * n))]] = True
    index = torch.arange(n)
    return index[~held], index[held]


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's batches of example indices: a permutation of n seeded by (seed, epoch), so a
    resumed run sees the same order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return list(order.split(batch_size))


def collate(batch: Sequence[Sequence[int] | torch.Tensor], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), right-padded."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : len(x)] = torch.as_tensor(x)
        mask[b, : len(x)] = 1
    return ids.to(device), mask.to(device)


# -- the loss --------------------------------------------------------------------------------------


def lm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, backward: bool = False, scale: float = 1.0) -> tuple[float, int]:
    """(sum of next-token cross-entropies over the real tokens, their count), as transformers'
    causal-LM loss computes them (its mean is sum / count). With `backward`, the gradient of
    `scale` x the sum is accumulated into the model's parameters.

    The LM head and its loss run _HEAD_CHUNK positions at a time, by hand: logits, log-sum-exp,
    softmax minus one-hot in place, then the input gradient and the weight gradient (accumulated
    in place into one buffer), so no chunk's logits outlive it and the head's weight gradient is
    written once, not added per chunk; the body's backward then starts from the input gradient."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, E)
    head = model.get_output_embeddings()
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    keep = mask[:, 1:].reshape(-1).bool()
    h, targets = h[keep], targets[keep]
    weight = head.weight
    total = 0.0
    if not backward or getattr(head, "bias", None) is not None:  # scoring, or a head with a bias: autograd
        detached = h.detach().requires_grad_(backward)
        for start in range(0, h.shape[0], _HEAD_CHUNK):
            logits = head(detached[start : start + _HEAD_CHUNK]).float()
            loss = torch.nn.functional.cross_entropy(logits, targets[start : start + _HEAD_CHUNK], reduction="sum")
            if backward:
                (loss * scale).backward()
            total += float(loss.detach())
        if backward:
            h.backward(detached.grad)
        return total, int(targets.numel())
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        w, hd = weight.detach(), h.detach().to(weight.dtype)
        dh, dw = torch.empty_like(hd), torch.empty_like(w)
        for start in range(0, hd.shape[0], _HEAD_CHUNK):
            hc, tc = hd[start : start + _HEAD_CHUNK], targets[start : start + _HEAD_CHUNK]
            logits = hc @ w.t()  # (k, V)
            picked = logits.gather(1, tc[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(top).exp_()  # in place, as is all that follows: one (k, V) buffer per chunk
            sums = grad.sum(dim=-1, keepdim=True)
            total += float((top[:, 0] + sums[:, 0].log() - picked).sum())  # log-sum-exp minus the target's logit
            grad.mul_(scale / sums)  # the softmax, times the scale
            grad[torch.arange(tc.shape[0], device=tc.device), tc] -= scale
            torch.mm(grad, w, out=dh[start : start + _HEAD_CHUNK])
            if start == 0:
                torch.mm(grad.t(), hc, out=dw)  # the first chunk writes the buffer: no pass to zero it
            else:
                dw.addmm_(grad.t(), hc)
    if weight.grad is None:
        weight.grad = dw
    else:
        weight.grad.add_(dw)
    h.backward(dh.to(h.dtype))
    return total, int(targets.numel())


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class State:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch done
    log_lines: int = 0


class Trainer:
    """One fine-tuning run into `out`."""

    def __init__(
        self,
        settings: TrainSettings,
        schedule: Schedule,
        out: Path,
        data: Corpus,
        val_data: Corpus | None,
        device: str,
        dtype: str,
        say: Callable[[str], None],
    ) -> None:
        from aigc_cli.models.loading import load_trainable, pick_device

        self.s, self.schedule, self.out, self.say = settings, schedule, out, say
        self.device = pick_device(device)
        self.autocast = self.device == "cuda" and dtype in ("auto", "bfloat16")
        self.model, self.tokenizer, self.context = load_trainable(settings.model, self.device)
        _fuse_activations(self.model)
        _reuse_freed_memory()
        self.block = settings.block_size or min(self.context, 1024)
        if self.block > self.context:
            raise UsageError(f"--block-size: {self.block} is more than the model's context of {self.context} tokens")
        self._check_sample_prompt()
        self.train, self.val = self._examples(data, val_data)
        self.per_epoch = math.ceil(len(self.train) / settings.batch_size)
        self.total = settings.steps or max(1, math.ceil(settings.epochs * self.per_epoch / settings.grad_accum))
        self.fingerprint: dict[str, Any] = {"data": data.digest, "settings": dataclasses.asdict(settings)}
        torch.manual_seed(settings.seed)
        self.optimizer = torch.optim.AdamW(self._groups(), lr=settings.lr, **_fused(self.device))
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, settings.warmup_steps, self.total)
        self.state = State()
        self._step_start: tuple[State, torch.Tensor, Any] | None = None  # (state, rng states) when the running step began
        self.saved_step: int | None = None  # the step of the checkpoint in DIR, if there is one

    def _examples(self, data: Corpus, val_data: Corpus | None) -> tuple[Examples, Examples]:
        """(training, validation) examples: the validation file's, or a split of the data's."""
        s = self.s
        examples = tokenize(self.tokenizer, data.documents(), self.block, s.line_by_line, data.size)
        if not len(examples):
            raise UsageError("the data has no tokens to train on")
        if val_data is not None:
            train, val = examples, tokenize(self.tokenizer, val_data.documents(), self.block, s.line_by_line, val_data.size)
        else:
            held_in, held_out = split_validation(len(examples), s.val_split, s.seed)
            train, val = examples.subset(held_in), examples.subset(held_out)
        if not len(train):
            raise UsageError("--val-split: nothing is left to train on")
        return train, val

    def _check_sample_prompt(self) -> None:
        """A sample (the prompt and its 40 new tokens) must fit the model's context."""
        if self.schedule.sample_every and self.schedule.sample_prompt:
            n = len(self.tokenizer.encode(self.schedule.sample_prompt, add_special_tokens=False))
            if n + _SAMPLE_TOKENS > self.context:
                raise UsageError(
                    f"--sample-prompt: {n} tokens; with the sample's {_SAMPLE_TOKENS} it must fit the model's context of {self.context}"
                )

    def _groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices, not on biases and norms (as transformers' Trainer does)."""
        decay: list[torch.nn.Parameter] = []
        plain: list[torch.nn.Parameter] = []
        for name, p in self.model.named_parameters():
            (plain if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": self.s.weight_decay}, {"params": plain, "weight_decay": 0.0}]

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Everything the run needs to continue exactly, as of the last whole step (an interruption
        mid-step drops that step's partial gradients, data position and dropout draws), written
        atomically (see `write_atomically`): the last good checkpoint stays until this one is whole."""
        target = self.out / CHECKPOINT
        target.mkdir(parents=True, exist_ok=True)
        at, rng, cuda_rng = self._step_start if self._step_start is not None else (self.state, torch.get_rng_state(), None)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "cuda_rng": cuda_rng,
            "state": dataclasses.asdict(at),
            "fingerprint": self.fingerprint,
        }
        try:
            write_atomically(target / "state.pt", lambda fh: torch.save(state, fh), _tensor_bytes(state))
        except OutputError as exc:
            raise self._failure(target / "state.pt", exc, None) from None
        self.saved_step = at.step

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT / "state.pt"
        if not path.is_file():
            raise UsageError(f"--resume: {self.out} holds no checkpoint to resume from")
        saved = torch.load(path, map_location=self.device, weights_only=False)
        theirs, ours = saved["fingerprint"], self.fingerprint
        if theirs["data"] != ours["data"]:
            raise UsageError(f"--resume: the data differs from the checkpoint's in {self.out}")
        differ = [k for k in ours["settings"] if theirs["settings"].get(k) != ours["settings"][k]]
        if differ:
            names = ", ".join(f"--{k.replace('_', '-')} ({theirs['settings'].get(k)!r} then, {ours['settings'][k]!r} now)" for k in differ)
            raise UsageError(f"--resume: settings differ from the checkpoint's: {names}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.state = State(**saved["state"])
        self.saved_step = self.state.step
        log = self.out / LOG
        if log.exists():  # lines written after the checkpoint are written again
            lines = log.read_text().splitlines(keepends=True)[: self.state.log_lines]
            log.write_text("".join(lines))

    # -- evaluation and samples ---------------------------------------------------------------

    @torch.inference_mode()
    def val_perplexity(self) -> float | None:
        """Perplexity of the validation examples, by `aigc score`'s computation on each: BOS and the
        example in one window when they fit the model's context, else sliding windows that do."""
        if not self.val:
            return None
        from aigc_cli.models.backends import TransformersBackend
        from aigc_cli.engine.scoring import perplexity

        self.model.eval()
        backend = TransformersBackend(self.model)
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        nll = count = 0.0
        for i in range(len(self.val)):
            p = perplexity(backend, self.val[i], bos, min(self.block + 1, self.context), device=self.device)
            nll += p.nll * p.tokens
            count += p.tokens
        self.model.train()
        return math.exp(nll / count) if count else None

    @torch.inference_mode()
    def sample(self) -> str:
        from types import SimpleNamespace

        from aigc_cli.models.backends import TransformersBackend
        from aigc_cli.engine.decoding import generate_rows
        from aigc_cli.core.settings import GenerationSettings

        self.model.eval()
        prompt = self.schedule.sample_prompt or self.tokenizer.decode(self.train[0][:8].tolist())
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) or [self.tokenizer.eos_token_id]
        lm = SimpleNamespace(model=TransformersBackend(self.model), tokenizer=self.tokenizer, device=self.device)
        settings = GenerationSettings(max_new_tokens=_SAMPLE_TOKENS, seed=self.s.seed).resolved()
        with _rng_kept():
            (row,) = generate_rows(lm, [ids], settings, [self.s.seed + self.state.step])
        self.model.train()
        return prompt + row.text

    # -- training -----------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        """One line of the training log (a line cut short by a full disk is cut off by --resume)."""
        try:
            with open(self.out / LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise self._failure(self.out / LOG, exc, None) from None
        self.state.log_lines += 1

    def run(self, progress: Callable[[int, float, float], None]) -> dict[str, Any]:
        """Train to the last step, then checkpoint, evaluate and save the model."""
        s = self.s
        self.model.train()
        before = self.val_perplexity() if self.state.step == 0 else None
        if before is not None:
            self.say(f"validation perplexity before: {before:.2f}")
            self._log({"step": 0, "val_perplexity": before})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        epoch_batches = batches(len(self.train), s.batch_size, s.seed, self.state.epoch)
        started, tokens_seen = time.perf_counter(), 0
        while self.state.step < self.total:
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            self._step_start = (dataclasses.replace(self.state), torch.get_rng_state(), cuda_rng)
            micro = []
            for _ in range(s.grad_accum):
                if self.state.batch >= len(epoch_batches):
                    self.state.epoch, self.state.batch = self.state.epoch + 1, 0
                    epoch_batches = batches(len(self.train), s.batch_size, s.seed, self.state.epoch)
                micro.append(collate([self.train[int(i)] for i in epoch_batches[self.state.batch]], pad, self.device))
                self.state.batch += 1
            # the gradient of the mean over every target token of the step, micro-batch by micro-batch
            count = int(sum(int(mask[:, 1:].sum()) for _, mask in micro))
            loss_sum = 0.0
            for ids, mask in micro:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    part, _ = lm_loss(self.model, ids, mask, backward=True, scale=1.0 / max(count, 1))
                loss_sum += part
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            tokens_seen += count
            rate = tokens_seen / max(time.perf_counter() - started, 1e-9)
            loss = loss_sum / max(count, 1)
            with _uninterrupted():  # the update, the step count and its log line: all or nothing
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                self._step_start = None
                self._log({"step": self.state.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": rate})
            every = self.schedule
            if every.eval_every and self.state.step % every.eval_every == 0 and self.state.step < self.total:
                self._log({"step": self.state.step, "val_perplexity": self.val_perplexity()})
            progress(self.state.step, loss, rate)
            if every.sample_every and self.state.step % every.sample_every == 0:
                self.say(f"sample at step {self.state.step}: {self.sample()!r}")
            if every.save_every and self.state.step % every.save_every == 0 and self.state.step < self.total:
                self.save_checkpoint()
        self._checkpoint_the_end()
        after = self.val_perplexity()
        if after is not None:
            self.say(f"validation perplexity after: {after:.2f}")
            self._log({"step": self.state.step, "val_perplexity": after})
        self.save_model()
        return {"steps": self.state.step, "val_perplexity_before": before, "val_perplexity_after": after}

    def _checkpoint_the_end(self) -> None:
        """The last step's checkpoint, written before the model (whatever --save-every says): if the
        model cannot be written, --resume continues from here and loses no step. If this checkpoint
        cannot be written, the model is still tried (it is smaller)."""
        if self.saved_step == self.state.step:
            return
        try:
            self.save_checkpoint()
        except OutputError as exc:
            self.say(f"aigc: warning: {exc.message}")

    def save_model(self) -> None:
        """The standard model directory, each file written whole (and synced) before it replaces the
        old one; the checkpoint goes once the model is there. A failed write leaves nothing half
        written, and its error says where the last checkpoint is."""
        staging = self.out / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        self.model.eval()
        try:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            for f in staging.iterdir():
                _sync(f)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            name = Path(exc.filename).name if isinstance(exc, OSError) and exc.filename else "model.safetensors"
            raise self._failure(self.out / name, exc, _tensor_bytes(self.model.state_dict())) from None
        for f in staging.iterdir():
            os.replace(f, self.out / f.name)
        staging.rmdir()
        _sync(self.out)
        shutil.rmtree(self.out / CHECKPOINT, ignore_errors=True)

    def _failure(self, path: Path, exc: BaseException, needed: int | None) -> BaseException:
        """A failed write of `path` as one line that also says where the last good checkpoint is
        (`exc` itself when it is not a failed write)."""
        failure = exc if isinstance(exc, OutputError) else write_failure(path, exc, needed)
        if failure is None:
            return exc
        if self.saved_step is None:
            return OutputError(f"{failure.message}; there is no checkpoint to resume from")
        where = self.out / CHECKPOINT / "state.pt"
        return OutputError(
            f"{failure.message}; the last good checkpoint (step {self.saved_step}) is kept in {where}: "
            "make room, then rerun the same command with --resume to continue from it"
        )


class OutputLock:
    """The -o directory, made if need be and locked for the whole run: an flock on DIR/LOCK, a file
    that also holds the holder's pid. A second run on the directory is refused (exit 2, naming the
    holder's pid) before it changes anything there. The lock goes with the process however it ends;
    the file goes at the end, and so does a directory made for a run that failed before writing."""

    def __init__(self, out: Path) -> None:
        self.out, self.path, self.fd, self.made = out, out / LOCK, -1, False

    def __enter__(self) -> OutputLock:
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"-o {self.out}: is a file, not a directory")
        self.made = not self.out.exists()
        while self.fd < 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise UsageError(f"-o {self.out}: cannot write there ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _lock_holder(fd) or os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise UsageError(
                        f"-o {self.out}: another aigc finetune (pid {holder}) is writing there; "
                        "wait for it to finish, or choose another directory"
                    ) from None
            if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                self.fd = fd
            else:  # its last holder removed it between our open and our lock: lock the new one
                os.close(fd)
        with contextlib.suppress(OSError):  # for people; /proc/locks names the holder even without it
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)  # while still locked: a run that opened it will retry
        os.close(self.fd)
        if self.made:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """DIR (locked by OutputLock) must be writable; a DIR holding a model is refused unless
    --overwrite (or --resume). What a killed run left half-written goes; a new run (no --resume)
    also drops the old log and checkpoint."""
    holds_model = (out / "config.json").exists() or any(out.glob("*.safetensors"))
    if holds_model and not (overwrite or resume):
        raise UsageError(f"-o {out}: already holds a model; pass --overwrite to replace it, or another directory")
    shutil.rmtree(out / ".staging", ignore_errors=True)
    for tmp in (out / CHECKPOINT).glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    if not resume:
        (out / LOG).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


# -- writing files --------------------------------------------------------------------------------


class _Recording:
    """A binary file that keeps the first error of its writes: torch.save turns a failed write into
    "RuntimeError: [enforce fail at inline_container.cc]", which names neither file nor cause."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.fh.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def write_atomically(path: Path, write: Callable[[Any], None], needed: int) -> None:
    """`write(file)` into a temporary file beside `path`, flushed and synced, then renamed over
    `path`: the old file stays whole until the new one is. On any failure the temporary file goes;
    a failed write is an OutputError naming `path` (and for a full disk, the space needed, about
    `needed` bytes, and free)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failure(path, exc, needed) or exc from None
    out = _Recording(os.fdopen(fd, "wb"))
    try:
        with out.fh:
            write(out)
            out.fh.flush()
            os.fsync(out.fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        failure = write_failure(path, out.error or exc, needed)
        if failure is None:
            raise
        raise failure from None
    _sync(path.parent)


def write_failure(path: Path, exc: BaseException, needed: int | None) -> OutputError | None:
    """A failed write of `path` as one line (a full disk: with the space needed and free); None for
    an exception that is not a failed write. The cause is an OSError's errno, or the one a Rust
    library (safetensors) writes in its message."""
    code = exc.errno if isinstance(exc, OSError) else None
    match = re.search(r"os error (\d+)", str(exc)) if code is None else None
    code = int(match.group(1)) if match else code
    if code is None:
        return None
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    space = f"needs about {_size(needed)}, {free}" if needed is not None else free
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: no space left on device ({space})")
    return OutputError(f"{path}: cannot write ({os.strerror(code)}; {space})")


def _size(n: int) -> str:
    """A byte count for people: "4.5 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state, each storage counted once: about what it takes on disk."""
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(storages.values())


def _sync(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system that cannot sync a directory
    finally:
        os.close(fd)


def _fuse_activations(model: Any) -> None:
    """GPT-2's "gelu_new", written out in Python as six element-wise ops (and as many in backward),
    becomes torch's fused tanh GELU: the same function (to float rounding), fewer passes over the
    MLP's activations. Dropout layers become `_Dropout` (the same distribution, drawn faster). The
    saved config keeps its names, so nothing changes for inference."""
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, PytorchGELUTanh().train(child.training))
            elif type(child) is torch.nn.Dropout:
                setattr(module, name, _Dropout(child.p).train(child.training))


class _DropoutFn(torch.autograd.Function):
    """Inverted dropout with a mask from uniform draws: `torch.rand` is about twice as fast on CPU
    as the Bernoulli draws of `nn.Dropout`, and the mask is kept as bytes, as `nn.Dropout` keeps it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand(x.shape, device=x.device, dtype=torch.float32).ge(p)  # bool: a byte per value
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class _Dropout(torch.nn.Dropout):
    """`nn.Dropout` (same `p`, read by transformers' attention for its own dropout) drawn by `_DropoutFn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        return _DropoutFn.apply(x, self.p)


def _reuse_freed_memory() -> None:
    """glibc hands large freed blocks back to the OS and maps fresh ones for the next step, paying a
    page fault per 4 KiB every step (here ~0.3 s per GB). Keep blocks up to 32 MiB (the largest
    glibc allows) in the heap for reuse, and do not trim it. Linux with glibc only."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _fused(device: str) -> dict[str, Any]:
    """AdamW's fused kernel where this torch has it for the device (one pass over the parameters)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return {}
    return {"fused": True}


class _uninterrupted:
    """A block that Ctrl-C or SIGTERM cannot split (in the main thread): a signal that arrives
    inside it raises KeyboardInterrupt as the block ends. An interruption inside an optimizer step,
    or between a step and its log line, would save a checkpoint that no longer matches the weights
    or the log."""

    def __enter__(self) -> None:
        self.caught, self.saved = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._hold)

    def _hold(self, signum: int, frame: Any) -> None:
        self.caught = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt


class _rng_kept:
    """Sampling mid-training must not move the training's random stream (dropout)."""

    def __enter__(self) -> None:
        self.state = torch.get_rng_state()

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.state)

