"""A lean GPT-2 forward pass in plain PyTorch with a preallocated KV cache (and, decoding on the
CPU, a few compiled row kernels: fused.py).

It reads Hugging Face GPT-2 checkpoints (config.json + safetensors) directly, without importing
transformers' modeling code, and computes what `GPT2LMHeadModel` computes with the same weights:
same matmuls (addmm over Conv1D-layout weights), LayerNorm, tanh-GELU and scaled-dot-product
attention. Decoding steps read the cache in place instead of concatenating tensors each step.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from aigc_cli.models import fused
from aigc_cli.models import quantize as q8
from aigc_cli.models.weights import InMemory, SafetensorsReader, loading_memory


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    eps: float
    tied: bool
    n_inner: int = 0  # 0: 4 * n_embd

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this config holds (names without "transformer.")."""
        e, inner = self.n_embd, self.n_inner or 4 * self.n_embd
        out: dict[str, tuple[int, ...]] = {"wte.weight": (self.vocab_size, e), "wpe.weight": (self.n_positions, e)}
        for i in range(self.n_layer):
            p = f"h.{i}."
            out |= {p + "ln_1.weight": (e,), p + "ln_1.bias": (e,), p + "ln_2.weight": (e,), p + "ln_2.bias": (e,)}
            out |= {p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,)}
            out |= {p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,)}
            out |= {p + "mlp.c_fc.weight": (e, inner), p + "mlp.c_fc.bias": (inner,)}
            out |= {p + "mlp.c_proj.weight": (inner, e), p + "mlp.c_proj.bias": (e,)}
        out |= {"ln_f.weight": (e,), "ln_f.bias": (e,), "lm_head.weight": (self.vocab_size, e)}
        return out

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config | None:
        """None when the config uses something this implementation does not (then transformers runs it)."""
        if d.get("model_type") != "gpt2":
            return None
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn") or d.get("add_cross_attention"):
            return None
        if d.get("activation_function", "gelu_new") != "gelu_new" or d.get("scale_attn_weights", True) is False:
            return None
        return cls(
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_embd=d.get("n_embd", 768),
            n_positions=d.get("n_positions", 1024),
            vocab_size=d.get("vocab_size", 50257),
            eps=d.get("layer_norm_epsilon", 1e-5),
            tied=d.get("tie_word_embeddings", True),
            n_inner=d.get("n_inner") or 0,
        )


class KVCache:
    """Keys and values of every layer, preallocated for `capacity` positions."""

    def __init__(self, cfg: Config, batch: int, capacity: int, dtype: torch.dtype, device: str) -> None:
        head_dim = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep these rows, in this order, repeats allowed (finished rows leave the batch, beam search
        reorders its beams, contrastive search branches each row). Only the filled positions are
        copied, into the buffers the previous select left behind when they have the right number of
        rows (beam search every step; contrastive search's two sizes alternate): no fresh memory to
        fault in. Measured, 5 beams, 72 positions: 4.2 ms -> 0.1-0.9 ms per step."""
        rows, n = index.shape[0], self.length
        if self._spare is None or self._spare[0].shape[1] != rows:
            self._spare = None  # freed before new buffers are taken: the peak stays at two caches, as before
            shape = (self.k.shape[0], rows, *self.k.shape[2:])
            self._spare = (self.k.new_empty(shape), self.v.new_empty(shape))
        k, v = self._spare
        torch.index_select(self.k[:, :, :, :n], 1, index, out=k[:, :, :, :n])
        torch.index_select(self.v[:, :, :, :n], 1, index, out=v[:, :, :, :n])
        self._spare = (self.k, self.v)
        self.k, self.v = k, v

    def repeat_interleave(self, times: int) -> None:
        self.select(torch.arange(self.k.shape[1], device=self.k.device).repeat_interleave(times))


ATTENTION_BLOCK = 8  # slots per block of decode attention (neighbouring blocks of similar lengths merge)
_CALL_COST = 96  # one more attention call costs about as much as reading this many row-positions (2-core CPU: ~30 us against ~0.3 us per row-position)
_SWAP_GAIN = 8  # `SlotCache.tidy` swaps two rows only if the later one is longer by this many positions


def attention_blocks(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous blocks of slots (lo, hi, longest) for a decode step's attention: each block reads
    its rows' keys up to its own longest row, not the batch's. Neighbouring blocks of
    `ATTENTION_BLOCK` rows merge while one call over both costs less than two (rows of equal
    lengths stay one call)."""
    blocks: list[tuple[int, int, int]] = []
    for lo in range(0, len(lengths), ATTENTION_BLOCK):
        hi = min(lo + ATTENTION_BLOCK, len(lengths))
        top = max(lengths[lo:hi])
        if blocks:
            first, _, prev = blocks[-1]
            if (hi - first) * max(prev, top) <= (lo - first) * prev + (hi - lo) * top + _CALL_COST:
                blocks[-1] = (first, hi, max(prev, top))
                continue
        blocks.append((lo, hi, top))
    return blocks


@dataclass
class Stepped:
    """What `GPT2.step(..., states=True)` returns."""

    logits: torch.Tensor  # (rows, V) float32: running rows, then new ones
    hidden: torch.Tensor  # (rows, E) float32: the last layer's (normalised) state at each row's last position
    prompts: list[torch.Tensor]  # per new row, (prompt length, E): its state at every prompt position


class SlotCache:
    """Keys and values for continuous batching: one slot per running row, each row with its own
    length. Running rows occupy slots 0..rows-1 (a finished row's slot is refilled by the last
    row, so a decode step reads one contiguous block); slots and positions grow on demand.

    `k` is viewed as (layers, slots, heads, head_dim, positions), `v` and `keys` (the keys again)
    as (layers, slots, heads, positions, head_dim); how they are stored is the `layout`:
    - "heads": keys stored as `k` (transposed), values as `v`: a decode step's torch q @ K streams
      each key row in memory order, about 20% faster on CPU than over (positions, head_dim) keys.
    - "positions": both stored (layers, slots, positions, heads, head_dim), what the compiled
      attention (`fused.RowOps.attention`, CPU decoding) reads fastest: a row's keys, then its values, as
      one stream each. Measured, GPT-2 small shape, one row at 70 positions, one thread, the
      layer's cache cold: 68 -> 34 us a layer (~0.4 ms an int8 token of ~9.5)."""

    LAYOUTS = ("heads", "positions")

    def __init__(self, cfg: Config, dtype: torch.dtype, device: str, layout: str = "heads") -> None:
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown slot cache layout {layout!r}")
        self.cfg, self.dtype, self.device, self.layout = cfg, dtype, device, layout
        self.k = self.v = torch.empty(0)
        self.lengths: list[int] = []  # per running row: positions filled
        self.plan: Any = None  # the compiled attention's plan on these buffers (`GPT2._attention`); dropped when they change

    @property
    def keys(self) -> torch.Tensor:
        """The keys viewed as (layers, slots, heads, positions, head_dim), like `v`."""
        return self.k.transpose(3, 4)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def bytes_per_position(self) -> int:
        """Keys and values of one row at one position, all layers."""
        return 2 * self.cfg.n_layer * self.cfg.n_embd * self.dtype.itemsize

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.v.shape[1], self.v.shape[3]) if self.v.dim() == 5 else (0, 0)

    def reserve(self, slots: int, positions: int) -> None:
        """Room for at least `slots` rows of `positions` each (the caller sizes growth)."""
        have_slots, have_pos = self.capacity
        if slots <= have_slots and positions <= have_pos:
            return
        self.resize(max(slots, have_slots), max(positions, have_pos))

    def resize(self, slots: int, positions: int) -> None:
        """Exactly `slots` rows of `positions` (at least the running rows and their lengths)."""
        positions = min(positions, self.cfg.n_positions)
        if (slots, positions) == self.capacity:
            return
        layers, heads, head_dim = self.cfg.n_layer, self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head
        # zeros, not empty: masked positions still enter the attention's products, and 0 * NaN is NaN
        if self.layout == "heads":
            k = torch.zeros((layers, slots, heads, head_dim, positions), dtype=self.dtype, device=self.device)
            v = torch.zeros((layers, slots, heads, positions, head_dim), dtype=self.dtype, device=self.device)
        else:
            stored = (layers, slots, positions, heads, head_dim)
            k = torch.zeros(stored, dtype=self.dtype, device=self.device).permute(0, 1, 3, 4, 2)
            v = torch.zeros(stored, dtype=self.dtype, device=self.device).transpose(2, 3)
        if self.rows:
            n, filled = self.rows, max(self.lengths)
            k.transpose(3, 4)[:, :n, :, :filled] = self.keys[:, :n, :, :filled]
            v[:, :n, :, :filled] = self.v[:, :n, :, :filled]
        self.k, self.v, self.plan = k, v, None

    def tidy(self, swaps: int = 2) -> list[tuple[int, int]]:
        """Move the running rows a little towards longest-first order, so that each block of
        neighbouring slots (see `attention_blocks`) holds rows of similar lengths: up to `swaps`
        times, the shortest row of the first block that has a clearly longer row after it trades
        places with the longest such row. Returns the swapped slot pairs (the caller's rows follow).
        Rows grow together, so an order lasts; a step frays it only where rows finished (the last
        row fills each freed slot) or joined. Two row copies per step keep it near sorted, where
        a full sort copies the whole cache."""
        done: list[tuple[int, int]] = []
        lengths = self.lengths
        for _ in range(swaps):
            for lo in range(0, self.rows - ATTENTION_BLOCK, ATTENTION_BLOCK):
                i = min(range(lo, lo + ATTENTION_BLOCK), key=lengths.__getitem__)
                j = max(range(lo + ATTENTION_BLOCK, self.rows), key=lengths.__getitem__)
                if lengths[j] >= lengths[i] + _SWAP_GAIN:
                    break
            else:
                return done
            short, long = lengths[i], lengths[j]
            for cache in (self.keys, self.v):
                kept = cache[:, i, :, :short].clone()
                cache[:, i, :, :long] = cache[:, j, :, :long]
                cache[:, j, :, :short] = kept
            lengths[i], lengths[j] = long, short
            done.append((i, j))
        return done

    def fork(self, slot: int, times: int) -> None:
        """`times` more rows after the last, each a copy of `slot`'s (contrastive search's branches;
        the rows that share a prompt prefilled once; the caller reserved room)."""
        n, filled = self.rows, self.lengths[slot]
        for cache in (self.keys, self.v):
            cache[:, n : n + times, :, :filled] = cache[:, slot : slot + 1, :, :filled]
        self.lengths += [filled] * times

    def copy_position(self, source: int, targets: list[int], position: int) -> None:
        """One position's keys and values from `source` into each target row (branches that share
        every earlier position take the chosen branch's newest one)."""
        index = torch.tensor(targets, dtype=torch.long, device=self.v.device)
        for cache in (self.keys, self.v):
            cache[:, index, :, position] = cache[:, source, None, :, position]

    def remove(self, slot: int) -> None:
        """Free a row's slot; the last row moves into it."""
        last = self.rows - 1
        if slot != last:
            n = self.lengths[last]
            self.keys[:, slot, :, :n] = self.keys[:, last, :, :n]
            self.v[:, slot, :, :n] = self.v[:, last, :, :n]
            self.lengths[slot] = n
        self.lengths.pop()


class _Linear:
    """y = x @ W + b for a Conv1D-layout weight W (in, out).

    On CPU in float32 the weight is prepacked for oneDNN once: MKL's sgemm, which torch uses
    otherwise, runs at about half the memory bandwidth for one row and is slower still for a few
    rows on the AMD EPYC machines we measured (bench/RESULTS.md). AIGC_ONEDNN=0 turns it off.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight: torch.Tensor | None = weight  # None once packed
        self.bias = bias
        self.packed: torch.Tensor | None = None  # oneDNN's layout of the weight
        self.zero_bias: torch.Tensor | None = None  # the bias for the packed call (zeros when there is none)
        self.pad: torch.Tensor | None = None  # zero rows that fill a packed call up to PACKED_MIN_ROWS, made once

    def to(self, device: str | None, dtype: torch.dtype | None, scratch: Any = None) -> _Linear:
        """This linear on `device` in `dtype`, packed where oneDNN runs it. `scratch`: a
        `threading.local` whose buffer transposed weights are copied into before packing (see
        `_transposed`); None: oneDNN copies the transposed weight itself."""
        assert self.weight is not None, "a packed _Linear is not moved again"
        weight = self.weight.to(device=device, dtype=dtype)
        bias = self.bias.to(device=device, dtype=dtype) if self.bias is not None else None
        out = _Linear(weight, bias)
        if _use_onednn(weight):
            out.packed = torch.ops.mkldnn._reorder_linear_weight(_transposed(weight, scratch), 32)
            out.zero_bias = bias if bias is not None else torch.zeros(weight.shape[1], dtype=weight.dtype)
            out.weight = None  # the packed copy replaces it
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            rows = x.shape[0]
            if rows >= PACKED_MIN_ROWS:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.zero_bias, "none", [], "")
            # Fewer rows go through oneDNN's kernel for PACKED_MIN_ROWS, zeros below them: its
            # one-row kernel streams the weights slower (see PACKED_MIN_ROWS), and every row then
            # gets the same bits alone as among other rows.
            if self.pad is None or self.pad.shape[0] < PACKED_MIN_ROWS - rows:
                self.pad = x.new_zeros(PACKED_MIN_ROWS - 1, x.shape[1])
            padded = torch.cat((x, self.pad[: PACKED_MIN_ROWS - rows]))
            return torch.ops.mkldnn._linear_pointwise(padded, self.packed, self.zero_bias, "none", [], "")[:rows]
        assert self.weight is not None
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)


PACKED_MIN_ROWS = 4
"""A packed matmul over fewer rows runs as one over this many, the others zeros. Measured on a 2-core
AMD EPYC (bench/RESULTS-decode.md), a pass over GPT-2 small's weight matrices with oneDNN's packed
kernels: one thread 34.9 ms for one row, 40.6 for two, 26.9 for four; two threads 19.5, 24.5, 18.3.
oneDNN's one-row kernel also sums a 3,072-wide product in another order than its kernels for more
rows, so that padding makes a row's logits the same bits alone as in a batch."""


def _transposed(weight: torch.Tensor, scratch: Any) -> torch.Tensor:
    """weight.t() contiguous, for oneDNN's reorder: given a transposed view it makes a contiguous
    copy of its own, in fresh memory every time, and the page faults of that memory cost more than
    the copy (measured, a 768 x 3072 matrix, one thread: 13 ms from the view, 9 ms through a buffer
    used again). A Conv1D weight (in, out) is copied into `scratch`'s buffer, kept per thread and
    grown as needed; a weight whose transpose is contiguous already (the LM head) is not copied."""
    view = weight.t()
    if view.is_contiguous() or scratch is None:
        return view
    buf = getattr(scratch, "buf", None)
    if buf is None or buf.numel() < view.numel():
        buf = scratch.buf = torch.empty(view.numel(), dtype=view.dtype)
    return buf[: view.numel()].view(view.shape).copy_(view)


def _use_onednn(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_on()


def _onednn_on() -> bool:
    import os

    return (
        os.environ.get("AIGC_ONEDNN", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _to_pack(tensors: Any, name: str, device: str, dtype: torch.dtype | None) -> torch.Tensor:
    """Checkpoint tensor `name`, for a `_Linear` about to be built on `device` in `dtype`. When it
    will be packed (float32 on the CPU) and the reader can map the file, a tensor over a map of it:
    oneDNN's reorder then reads the weight once, straight from the page cache, instead of from a
    copy read first; the map goes with the tensor. Measured, GPT-2 small, one thread: reading and
    packing every matrix 0.64 -> 0.50 s. Otherwise the tensor as the reader reads it."""
    mapped = getattr(tensors, "mapped", None)
    if mapped is not None and torch.device(device).type == "cpu" and dtype in (None, torch.float32) and _onednn_on():
        try:
            weight = mapped(name)
        except (OSError, ValueError):  # no memory maps here: read it
            weight = None
        if weight is not None and weight.dtype == torch.float32:
            return weight
    return tensors[name]


class GPT2:
    """GPT-2 weights and forward pass; inference only. A model backend (backends.Backend) with
    per-row KV slots for continuous batching."""

    continuous = True

    def __init__(
        self,
        cfg: Config,
        tensors: Any,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        quantize: str = "none",
        int8_cache: q8.Int8Cache | None = None,
    ) -> None:
        """`tensors` maps checkpoint names (with or without "transformer.") to tensors; it may read
        them lazily, so that each weight is moved (and packed) as it is read and peak memory stays
        near one copy of the model. `quantize` "int8" or "fp16" (CPU only) stores the matmul weights
        and token embeddings in reduced precision (fast mode); activations stay float32. `int8_cache`
        holds int8 weights of an earlier run (and keeps this run's for the next)."""
        if quantize not in q8.QUANTIZE_MODES:
            raise ValueError(f"quantize: {quantize!r}")
        self.cfg, self.quantize = cfg, quantize
        cache = int8_cache or q8.Int8Cache(None)
        if quantize != "none":
            device, dtype = "cpu", torch.float32
        names = {k.removeprefix("transformer."): k for k in tensors.keys()}

        def get(name: str) -> torch.Tensor:
            return tensors[names[name]].to(device=device, dtype=dtype)

        def packable(name: str) -> torch.Tensor:  # a checkpoint tensor for a _Linear: see _to_pack
            return _to_pack(tensors, name, device, dtype).to(device=device, dtype=dtype)

        def linear(name: str) -> Any:
            weight, bias = names[name + ".weight"], names[name + ".bias"]
            if quantize == "int8":
                return q8.int8_linear(tensors, weight, bias, cache)
            if quantize == "fp16":
                return q8.Fp16Linear(tensors[weight], tensors[bias])
            return _Linear(packable(weight), tensors[bias]).to(device, dtype, scratch)

        # Two loader threads: reading, quantizing and packing each weight are single-threaded
        # torch calls that release the GIL (measured, GPT-2 small: float32 1.1 -> 0.9 s, int8 2.7 -> 2.0 s,
        # fp16 2.5 -> 1.6 s). The token table and LM head (the largest single weight) load alongside.
        matmuls = [f"h.{i}.{m}" for i in range(cfg.n_layer) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        tied = cfg.tied or "lm_head.weight" not in names
        # Each loader thread's buffer for transposing weights (_transposed), freed with this call.
        # Measured, GPT-2 small, two threads: load 0.38 -> 0.28-0.32 s, page faults 211k -> 135k.
        scratch = threading.local()
        with ThreadPoolExecutor(max_workers=2) as pool:
            table_and_head = pool.submit(self._table_and_head, tensors, names, tied, quantize, get, packable, cache)
            packed = iter(list(pool.map(linear, matmuls)))
            self.embed, self.head, wte = table_and_head.result()
        if wte is not None:
            self.wte = wte
        self.layers = []
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            attn, proj, fc, fc_out = (next(packed) for _ in range(4))
            self.layers.append(
                [get(p + "ln_1.weight"), get(p + "ln_1.bias"), attn, proj, get(p + "ln_2.weight"), get(p + "ln_2.bias"), fc, fc_out]
            )
        self.ln_f = (get("ln_f.weight"), get("ln_f.bias"))
        self.wpe = get("wpe.weight")
        self._act = self.wpe  # dtype and device of activations and of the KV cache
        # A model this small computes on one CPU thread: its matrices are so narrow that a second
        # thread costs more in waking and waiting than it saves (the built-in 64-wide models: 50
        # decode steps took 6.0 s on two threads with the other core busy, 0.04 s on one).
        self.threads = 1 if self.device.type == "cpu" and cfg.n_embd <= SMALL_WIDTH else None
        # CPU decoding's layer norms, GELU and attention as compiled kernels where they build (see
        # fused.py), for float32 activations (the exact mode and int8); both decoding steps use
        # them, so a row gets the same bits from either. Measured for the exact mode, GPT-2 small,
        # 2-core AMD EPYC, lockstep in one process: one row 0.8% (one thread) and 3.6% (two) faster
        # a step, five rows 5.5% and 11.7% (bench/RESULTS-decode.md).
        self.rowops = fused.row_ops() if self.device.type == "cpu" and self.dtype == torch.float32 else None
        # the layer norms in the order a step runs them (each layer's two, then the final one), bound
        # to their weights: the compiled kernel where it runs (weights checked once, here), else torch's
        pairs = [*((layer[i], layer[i + 1]) for layer in self.layers for i in (0, 4)), self.ln_f]
        int8_table = self.rowops is not None and isinstance(self.embed, q8.Embedding) and self.embed.scale is not None
        # token + position embeddings of a decoding step in one call (an int8 table), else torch's
        self.embed8 = self.rowops.embedding(self.embed.table, self.embed.scale, self.wpe) if int8_table else None  # type: ignore[union-attr]
        if self.rowops is not None:
            self.norms: list[Callable[..., torch.Tensor]] = [self.rowops.norm(w, b, cfg.eps) for w, b in pairs]
        else:
            self.norms = [functools.partial(F.layer_norm, normalized_shape=(cfg.n_embd,), weight=w, bias=b, eps=cfg.eps) for w, b in pairs]

    @staticmethod
    def _table_and_head(
        tensors: Any, names: dict[str, str], tied: bool, quantize: str, get: Any, packable: Any, cache: q8.Int8Cache
    ) -> tuple[Any, Any, Any]:
        """(token embedding, LM head, float token table or None) in the precision of `quantize`."""
        table, head_name = names["wte.weight"], names["wte.weight" if tied else "lm_head.weight"]
        if quantize == "int8":
            return (*q8.int8_embedding_and_head(tensors, table, head_name, tied, cache), None)
        if quantize == "fp16":
            return (*q8.fp16_embedding_and_head(tensors, table, head_name, tied), None)
        head_weight = packable(head_name)
        head = _Linear(head_weight.t(), None).to(str(head_weight.device), head_weight.dtype)
        # When the head keeps its own (packed) copy, the embedding reads rows from a map of the
        # file instead of a second copy of the table in memory (GPT-2 small: 154 MB less).
        can_map = hasattr(tensors, "mapped") and head_weight.device.type == "cpu" and (head.packed is not None or not tied)
        try:
            mapped = tensors.mapped(table) if can_map else None
        except (OSError, ValueError):  # a file system without memory maps: keep the table in memory
            mapped = None
        if mapped is not None and mapped.dtype == head_weight.dtype:
            wte = mapped
        else:
            wte = head_weight if tied else get("wte.weight")
        return functools.partial(F.embedding, weight=wte), head, wte

    @property
    def dtype(self) -> torch.dtype:
        return self._act.dtype

    @property
    def device(self) -> torch.device:
        return self._act.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, batch, min(capacity, self.cfg.n_positions), self.dtype, str(self.device))

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        with _threads(self.threads):
            return self._forward(ids, positions, key_mask, cache)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Hidden states after ln_f for `ids` (B, T); `key_mask` (B, S) marks real tokens among all S
        positions so far (cache + these). Padding positions attend to themselves only, so they stay finite."""
        cfg = self.cfg
        bsz, steps = ids.shape
        start = cache.length if cache is not None else 0
        total = start + steps
        if steps == 1 and cache is not None and self.rowops is not None and bool(key_mask[:, :total].all()):
            return self._decode_fused(ids, positions, cache, self.rowops)
        heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        x = self.embed(ids) + F.embedding(positions, self.wpe)
        mask = _attention_bias(key_mask[:, :total], start, steps, x.dtype)
        for i, (w1, b1, attn, proj, w2, b2, fc, fc_out) in enumerate(self.layers):
            h = F.layer_norm(x, (cfg.n_embd,), w1, b1, cfg.eps)
            qkv = attn(h.view(-1, cfg.n_embd)).view(bsz, steps, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
            if cache is not None:
                cache.k[i, :, :, start:total] = k
                cache.v[i, :, :, start:total] = v
                k, v = cache.k[i, :, :, :total], cache.v[i, :, :, :total]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            a = a.transpose(1, 2).reshape(bsz * steps, cfg.n_embd)
            x = x + proj(a).view(bsz, steps, cfg.n_embd)
            h = F.layer_norm(x, (cfg.n_embd,), w2, b2, cfg.eps)
            h = F.gelu(fc(h.view(-1, cfg.n_embd)), approximate="tanh")
            x = x + fc_out(h).view(bsz, steps, cfg.n_embd)
        if cache is not None:
            cache.length = total
        return F.layer_norm(x, (cfg.n_embd,), self.ln_f[0], self.ln_f[1], cfg.eps)

    def _decode_fused(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, ops: fused.RowOps) -> torch.Tensor:
        """`_forward` for one new token per row on a cache without padding (beam search's steps),
        with the row kernels that decoding on slots uses: the cache's keys and values are stored
        (layers, rows, heads, positions, head_dim), which the compiled attention reads as they are.
        Measured, GPT-2 small, 5 beams, one thread, 2-core AMD EPYC: see bench/RESULTS-decode.md."""
        rows, start = ids.shape[0], cache.length
        attention = ops.attention(cache.k, cache.v, 0, [start] * rows, (self.cfg.n_embd // self.cfg.n_head) ** -0.5)
        x = (self.embed(ids) + F.embedding(positions, self.wpe)).view(rows, -1)
        h = self._fused_layers(x, attention, ops)
        cache.length = start + 1
        return h.view(rows, 1, -1)

    def kv_bytes_per_position(self) -> int:
        return 2 * self.cfg.n_layer * self.cfg.n_embd * self.dtype.itemsize

    def new_slots(self) -> SlotCache:
        """An empty slot cache, laid out for the attention this model runs."""
        return SlotCache(self.cfg, self.dtype, str(self.device), "heads" if self.rowops is None else "positions")

    def step(
        self, tokens: torch.Tensor | None, slots: SlotCache, prompts: list[list[int]], states: bool = False, first: int = 0
    ) -> torch.Tensor | Stepped:
        with _threads(self.threads):
            # CPU only until measured on a GPU (no GPU was lent when it was written)
            if tokens is not None and not prompts and not states and self.device.type == "cpu":
                rows = tokens.shape[0]
                p = slots.lengths[first]
                if rows == 1 or all(n == p for n in slots.lengths[first + 1 : first + rows]):
                    return self._step_level(tokens, slots, first)
            return self._step(tokens, slots, prompts, states, first)

    def _step_level(self, tokens: torch.Tensor, slots: SlotCache, first: int) -> torch.Tensor:
        """`_step` for running rows that all stand at one position (batch-1 decoding, the weight-
        streaming bound; the sequences of one prompt, as `generate -n 5` makes them) and no new
        ones: the same kernels on the same values, so the same logits to the bit, without what
        rows of different lengths need (position and row index tensors, attention blocks and their
        masks, index_put writes into the cache, gathering each row's last state). The position is
        a Python int: the cache is written and read through plain slices. Measured, GPT-2 small,
        2-core AMD EPYC, one thread, same process: one row 29.9 against 30.7 ms a step, five rows
        32.0 against 33.1 (the matmuls are ~90% of a step; bench/RESULTS-decode.md)."""
        if self.rowops is not None:
            return self._step_level_fused(tokens, slots, first, self.rowops)
        if slots.layout != "heads":  # its lane views below need keys stored by head: copies would miss this step's writes
            return self._step(tokens, slots, [], False, first)  # type: ignore[return-value]
        cfg = self.cfg
        heads, head_dim, e, eps = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd, cfg.eps
        rows, p = tokens.shape[0], slots.lengths[first]
        x = self.embed(tokens) + self.wpe[p]
        scale, lanes = head_dim**-0.5, rows * heads  # lanes: one (row, head) pair each
        keys_t, values = slots.k[:, first : first + rows], slots.v[:, first : first + rows]  # (L, B, H, D, positions), (L, B, H, positions, D)
        # Each layer's views, taken once per step (unbind: one call for all layers):
        # where this step's keys and values go, (B, H, D) ...
        key_columns, value_rows = keys_t.select(4, p).unbind(0), values.select(3, p).unbind(0)
        # ... and what attention reads, one (row, head) lane after another: (B*H, D, p+1), (B*H, p+1, D)
        lane_keys, lane_values = keys_t[..., : p + 1].flatten(1, 2).unbind(0), values[:, :, :, : p + 1].flatten(1, 2).unbind(0)
        layer_norm, bmm, softmax, gelu, norm, lane_shape = F.layer_norm, torch.bmm, torch.softmax, F.gelu, (e,), (lanes, 1, head_dim)
        for (w1, b1, attn, proj, w2, b2, fc, fc_out), key_column, value_row, keys, vals in zip(self.layers, key_columns, value_rows, lane_keys, lane_values):
            q, k, v = attn(layer_norm(x, norm, w1, b1, eps)).view(rows, 3, heads, head_dim).unbind(1)
            key_column.copy_(k)
            value_row.copy_(v)
            # _decode_attention's two matmuls as batched (B*H, 1, D) @ (B*H, D, S) products: the same kernels
            x = x + proj(bmm(softmax(bmm(q.mul(scale).view(lane_shape), keys), -1), vals).view(rows, e))
            x = x + fc_out(gelu(fc(layer_norm(x, norm, w2, b2, eps)), approximate="tanh"))
        slots.lengths[first : first + rows] = [p + 1] * rows
        return self.logits(layer_norm(x, norm, self.ln_f[0], self.ln_f[1], eps)).float()

    def _step_level_fused(self, tokens: torch.Tensor, slots: SlotCache, first: int, ops: fused.RowOps) -> torch.Tensor:
        """`_step_level` with the compiled row kernels (exact and int8 on the CPU): per layer the four
        matmuls and four kernel calls (attention with its cache write; residual add + layer norm,
        twice; GELU), the same functions `_step` calls, so the same bits. Measured, GPT-2 small
        int8, one thread, 2-core AMD EPYC, batch-1 greedy: 11.4 -> 9.6 ms a token (forward) with
        the kernels, 9.4 -> 8.7 with the cache stored by position and the plan kept between steps,
        then ~0.15 ms less with the residual stream in one buffer checked once a step
        (`fused.Stream`) and the embeddings bound at load (bench/RESULTS-decode.md)."""
        rows, p = tokens.shape[0], slots.lengths[first]
        attention = self._attention(ops, slots, first, [p] * rows)
        x = self.embed8(tokens, attention.positions) if self.embed8 is not None else self.embed(tokens) + self.wpe[p]
        h = self._fused_layers(x, attention, ops)
        slots.lengths[first : first + rows] = [p + 1] * rows
        return self.head(h)  # (rows, vocab) float32 already: no reshape, no cast

    def _fused_layers(self, x: torch.Tensor, attention: fused.Attention, ops: fused.RowOps) -> torch.Tensor:
        """Every layer on one position per row, `x` (rows, E) its embeddings: ln_f of the last
        layer's output, in a buffer of its own."""
        norms: list[fused.Norm] = self.norms  # type: ignore[assignment]  # the kernels' own, where they run
        stream, gelu_ = ops.stream(x), ops.gelu_
        h = stream.norm(norms[0])  # one buffer, rewritten by each norm once the matmul before has read it
        for i, (_, _, attn, proj, _, _, fc, fc_out) in enumerate(self.layers):
            h = stream.norm(norms[2 * i + 1], proj(attention(i, attn(h))))
            h = stream.norm(norms[2 * i + 2], fc_out(gelu_(fc(h))))
        return h

    def _attention(self, ops: fused.RowOps, slots: SlotCache, first: int, positions: list[int]) -> fused.Attention:
        """The compiled attention for rows first.. at these positions: the previous step's plan when
        it was made for the same rows on the same buffers (set up cold, at the start of a step, a
        new one took ~0.08 ms of an int8 token), else a new one."""
        plan = slots.plan
        if isinstance(plan, fused.Attention) and plan.first == first and plan.rows == len(positions) and plan.reads(slots.v):
            return plan.at(positions)
        slots.plan = ops.attention(slots.keys, slots.v, first, positions, (self.cfg.n_embd // self.cfg.n_head) ** -0.5)
        return slots.plan

    def _step(  # one pass, kept whole: it is the decode loop's hot path, read top to bottom layer by layer
        self, tokens: torch.Tensor | None, slots: SlotCache, prompts: list[list[int]], states: bool = False, first: int = 0
    ) -> torch.Tensor | Stepped:
        """One continuous-batching step in one pass over the weights: `tokens` (B,), the next token of
        each running row, are written at each row's own position, and new rows' `prompts` (left-padded
        together) are prefilled into the slots after them. The matmuls run on all the step's tokens
        at once; attention runs apart for the running rows (on the slots) and the new ones (causal
        over their prompts). Returns next-token logits (B + len(prompts), V) in float32, running
        rows first. `slots` must have room (`reserve`) for every row. With `states`, a `Stepped`:
        the logits and the last-layer hidden states (contrastive search's context).

        `first`: the running rows are slots first..first+B-1 and the others are left as they are
        (the scheduler retries a failed step on part of the batch); new prompts always go after
        every running slot. A step that raises has changed no row's length, so it can be retried."""
        cfg = self.cfg
        heads, head_dim, e = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd
        dev, ops = self.device, self.rowops
        norms = self.norms  # the compiled kernels where they run: as `_step_level_fused` calls them
        act: Callable[[torch.Tensor], torch.Tensor] = functools.partial(F.gelu, approximate="tanh") if ops is None else ops.gelu_
        bsz = 0 if tokens is None else tokens.shape[0]
        parts = []
        lengths = slots.lengths[first : first + bsz]
        attention = None  # the compiled decode attention, when its kernels run
        if bsz:
            pos = torch.tensor(lengths, dtype=torch.long, device=dev)
            rows = torch.arange(first, first + bsz, device=dev)
            blocks = []  # (lo, hi, positions attended, mask hiding each shorter row's unused positions)
            attention = self._attention(ops, slots, first, lengths) if ops is not None else None
            for lo, hi, top in attention_blocks(lengths) if ops is None else []:
                mask = None
                if min(lengths[lo:hi]) != top:
                    keys = torch.arange(top + 1, device=dev)
                    mask = torch.zeros((hi - lo, 1, 1, top + 1), dtype=self.dtype, device=dev)
                    mask.masked_fill_((keys[None, :] > pos[lo:hi, None])[:, None, None, :], float("-inf"))
                blocks.append((lo, hi, top + 1, mask))
            if self.embed8 is not None and attention is not None and tokens is not None:
                parts.append(self.embed8(tokens, attention.positions))
            else:
                parts.append(self.embed(tokens) + F.embedding(pos, self.wpe))
        # New rows' prompts are packed end to end, without padding: the matmuls do not care where a
        # row starts, and attention runs on each prompt's own span.
        spans, start, base = [], bsz, slots.rows  # new rows take the slots after every running one
        for p in prompts:
            spans.append((start, len(p)))
            start += len(p)
        if prompts:
            ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
            positions = torch.cat([torch.arange(len(p)) for p in prompts]).to(dev)
            parts.append(self.embed(ids) + F.embedding(positions, self.wpe))
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        for i, (_, _, attn, proj, _, _, fc, fc_out) in enumerate(self.layers):
            qkv = attn(norms[2 * i](x))
            outs = []
            if bsz and attention is not None:
                outs.append(attention(i, qkv[:bsz]))
            elif bsz:
                q, k, v = qkv[:bsz].view(bsz, 3, heads, head_dim).unbind(1)  # each (B, H, D)
                slots.k[i, rows, :, :, pos] = k
                slots.v[i, rows, :, pos] = v
                q = (q * head_dim**-0.5)[:, :, None, :]
                for lo, hi, total, mask in blocks:
                    a_, b_ = first + lo, first + hi
                    a = _decode_attention(q[lo:hi], slots.k[i, a_:b_, :, :, :total], slots.v[i, a_:b_, :, :total], mask)
                    outs.append(a.reshape(hi - lo, e))
            for j, (begin, n) in enumerate(spans):
                q, k, v = qkv[begin : begin + n].view(n, 3, heads, head_dim).permute(1, 2, 0, 3).unbind(0)  # (H, n, D)
                slots.k[i, base + j, :, :, :n] = k.transpose(1, 2)
                slots.v[i, base + j, :, :n] = v
                a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)
                outs.append(a[0].transpose(0, 1).reshape(n, e))
            x = x + proj(torch.cat(outs) if len(outs) > 1 else outs[0])
            x = x + fc_out(act(fc(norms[2 * i + 1](x))))
        last = torch.tensor([*range(bsz), *(begin + n - 1 for begin, n in spans)], dtype=torch.long, device=dev)
        slots.lengths[first : first + bsz] = [n + 1 for n in lengths]
        slots.lengths += [len(p) for p in prompts]
        h = norms[-1](x[last])
        logits = self.logits(h).float()
        if not states:
            return logits
        spans_h = [norms[-1](x[begin : begin + n]).float() for begin, n in spans]
        return Stepped(logits, h.float(), spans_h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        """transformers-style call for whole sequences (scoring): `.logits` for every position."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return SimpleNamespace(logits=self.logits(self.forward(input_ids, positions, mask)))


SMALL_WIDTH = 256  # models at most this wide compute on one CPU thread


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` for a block (None: as they are), then restored; the
    rest of the process keeps its own setting. Setting and restoring costs about 8 us."""
    before = torch.get_num_threads() if count is not None else None
    if before is None or before == count:
        yield
        return
    torch.set_num_threads(count)  # type: ignore[arg-type]
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decode_attention(q: torch.Tensor, keys_t: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q K + mask) v for one new position per row: q (B, H, 1, D) already scaled, `keys_t`
    (B, H, D, S) and v (B, H, S, D) views of the slot cache. Two batched matmuls over the cache
    as it lies in memory (`scaled_dot_product_attention`'s CPU kernel is built for many queries
    per row, and wants keys as (S, D))."""
    scores = torch.matmul(q, keys_t)
    if mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, -1), v)


def _attention_bias(key_mask: torch.Tensor, start: int, steps: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention mask (B, 1, T, S), built once per forward rather than once per layer: causal,
    padding keys hidden, and padding positions attend to themselves only, so they stay finite. None
    for a CPU decoding step over unpadded rows (everything visible), the common case at batch 1."""
    total = key_mask.shape[1]
    if steps == 1 and key_mask.device.type == "cpu" and bool(key_mask.all()):
        return None
    keys = torch.arange(total, device=key_mask.device)
    queries = torch.arange(start, total, device=key_mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & key_mask[:, None, None, :].bool()
    allowed = allowed | (keys[None, :] == queries[:, None])[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill_(~allowed, float("-inf"))


def load_gpt2(path: Path, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str = "none") -> GPT2 | None:
    """The native model for a GPT-2 directory with safetensors weights; None when it is not one.
    Weights whose tensors are not the config's, or too large for memory, are refused (exit 3)."""
    from aigc_cli.models.checkpoint import check_fits, check_matches, read_config

    cfg = Config.from_hf(read_config(path))
    weights = path / "model.safetensors"
    if cfg is None or not weights.is_file():
        return None
    reader = SafetensorsReader(weights)
    stored = {name: tuple(reader.shape(name)) for name in reader.keys()}
    check_matches(str(weights), cfg.shapes(), stored, {"lm_head.weight"} if cfg.tied or "lm_head.weight" not in stored else set())
    check_fits(str(weights), sum(math.prod(s) for s in cfg.shapes().values()) * 4)
    cache = q8.Int8Cache(weights) if quantize == "int8" else None
    with loading_memory():
        model = GPT2(cfg, reader, device, dtype, quantize, cache)
    if cache is not None:
        cache.save()
    return model


def from_hf_model(
    model: Any, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str = "none"
) -> GPT2 | None:
    """The native model with the weights of a transformers GPT2LMHeadModel."""
    cfg = Config.from_hf(model.config.to_dict())
    if cfg is None:
        return None
    return from_state_dict(cfg, {k: v.detach() for k, v in model.state_dict().items()}, device, dtype, quantize)


def from_state_dict(
    cfg: Config, state: dict[str, torch.Tensor], device: str = "cpu", dtype: torch.dtype | None = None, quantize: str = "none"
) -> GPT2:
    """The native model with weights already in memory, named as in a GPT-2 checkpoint (the
    built-in tiny models)."""
    with loading_memory():
        return GPT2(cfg, InMemory(state), device, dtype, quantize)
