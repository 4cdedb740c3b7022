"""A lean GPT-2 forward pass in plain PyTorch with a preallocated KV cache.

It reads Hugging Face GPT-2 checkpoints (config.json + safetensors) directly, without importing
transformers' modeling code, and computes what `GPT2LMHeadModel` computes with the same weights:
same matmuls (addmm over Conv1D-layout weights), LayerNorm, tanh-GELU and scaled-dot-product
attention. Decoding steps read the cache in place instead of concatenating tensors each step.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    eps: float
    tied: bool

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
        )


class KVCache:
    """Keys and values of every layer, preallocated for `capacity` positions."""

    def __init__(self, cfg: Config, batch: int, capacity: int, dtype: torch.dtype, device: str) -> None:
        head_dim = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def select(self, index: torch.Tensor) -> None:
        """Keep these rows, in this order, repeats allowed (finished rows leave the batch, beam search
        reorders its beams, contrastive search branches each row). index_select: 2.4x faster than
        advanced indexing for beam search's reorder (measured: 1.6 vs 3.9 ms for 5 beams)."""
        self.k = torch.index_select(self.k, 1, index)
        self.v = torch.index_select(self.v, 1, index)

    def repeat_interleave(self, times: int) -> None:
        self.select(torch.arange(self.k.shape[1], device=self.k.device).repeat_interleave(times))


class _Linear:
    """y = x @ W + b for a Conv1D-layout weight W (in, out).

    On CPU in float32 the weight is prepacked for oneDNN once: MKL's sgemm, which torch uses
    otherwise, runs at about half the memory bandwidth for one row and is slower still for a few
    rows on the AMD EPYC machines we measured (bench/RESULTS.md). AIGC_ONEDNN=0 turns it off.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias, self.packed = weight, bias, None

    def to(self, device: str | None, dtype: torch.dtype | None) -> _Linear:
        weight = self.weight.to(device=device, dtype=dtype)
        bias = self.bias.to(device=device, dtype=dtype) if self.bias is not None else None
        out = _Linear(weight, bias)
        if _use_onednn(weight):
            out.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), 32)
            out.zero_bias = bias if bias is not None else torch.zeros(weight.shape[1], dtype=weight.dtype)
            out.weight = None  # the packed copy replaces it
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.zero_bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)


class _Int8Linear:
    """Fast mode `--quantize int8`: int8 weights (symmetric, one scale per output channel) in fbgemm's
    packed layout; fbgemm quantizes the activations on the fly (one scale per call, 7-bit range as
    fbgemm needs on AVX2) and accumulates in int32. Measured here: 3 ms for the LM head at batch 1
    (fp32: 9 ms), 14-19 ms at batch 32 (fp32: 31 ms)."""

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """`qweight`: the (out, in) weight as a per-channel qint8 tensor (`_per_channel`)."""
        self.packed = torch.ops.quantized.linear_prepack(qweight, _fp32(bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class _Fp16Linear:
    """Fast mode `--quantize fp16`: weights stored as float16 in fbgemm's packed layout, converted
    to float32 inside the kernel (weight-only: activations and accumulation stay float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.t().float().contiguous(), _fp32(bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q, scale) with weight ~= q * scale[:, None]."""
    scale = _int8_scales(weight)
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_scales(weight: torch.Tensor) -> torch.Tensor:
    return (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)


def _per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_int8_rows`' result as the per-channel qint8 tensor fbgemm's prepack takes."""
    with _quantized_tensors():
        return torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)


@contextlib.contextmanager
def _quantized_tensors() -> Iterator[None]:
    """torch marks quantized tensors deprecated (a warning per call); fbgemm's linear still takes them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_CHUNK_ROWS = 4096


def _int8_table(tensors: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`_int8_rows` of a (vocab, dim) table read a block of rows at a time, so that the float32
    table (154 MB for GPT-2) is never whole in memory."""
    n, dim = tensors.shape(name)
    q, scale = torch.empty((n, dim), dtype=torch.int8), torch.empty(n)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(n, start + _CHUNK_ROWS)
        q[start:stop], scale[start:stop] = _int8_rows(tensors.rows(name, start, stop).float())
    return q, scale


def _table_in(tensors: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A (vocab, dim) table converted to `dtype` a block of rows at a time."""
    n, dim = tensors.shape(name)
    out = torch.empty((n, dim), dtype=dtype)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(n, start + _CHUNK_ROWS)
        out[start:stop] = tensors.rows(name, start, stop)
    return out


@contextlib.contextmanager
def _loading_memory() -> Iterator[None]:
    """While weights load, every buffer of 1 MiB or more gets its own mapping, returned to the system
    when freed: otherwise glibc raises its mmap threshold after the first big free and serves the
    rest from a heap that only grows (measured: +150 MiB of peak for the int8 model). Afterwards the
    threshold is set to glibc's own upper bound and the freed heap pages are given back."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class _Embedding:
    """Token embeddings for the fast modes: int8 rows with their scales (shared with the LM head's
    quantization) or float16 rows, widened to float32 for the rows looked up."""

    def __init__(self, table: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        self.table, self.scale = table, scale

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table[ids].float()
        return rows if self.scale is None else rows * self.scale[ids].unsqueeze(-1)


QUANTIZE_MODES = ("none", "int8", "fp16")


def _use_onednn(weight: torch.Tensor) -> bool:
    import os

    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and os.environ.get("AIGC_ONEDNN", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class GPT2:
    """GPT-2 weights and forward pass; inference only."""

    def __init__(
        self,
        cfg: Config,
        tensors: Any,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        quantize: str = "none",
    ) -> None:
        """`tensors` maps checkpoint names (with or without "transformer.") to tensors; it may read
        them lazily, so that each weight is moved (and packed) as it is read and peak memory stays
        near one copy of the model. `quantize` "int8" or "fp16" (CPU only) stores the matmul weights
        and token embeddings in reduced precision (fast mode); activations stay float32."""
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize: {quantize!r}")
        self.cfg, self.quantize = cfg, quantize
        if quantize != "none":
            device, dtype = "cpu", torch.float32
        names = {k.removeprefix("transformer."): k for k in tensors.keys()}

        def get(name: str) -> torch.Tensor:
            return tensors[names[name]].to(device=device, dtype=dtype)

        def linear(name: str, bias: bool = True) -> Any:
            weight, b = tensors[names[name + ".weight"]], (tensors[names[name + ".bias"]] if bias else None)
            if quantize == "int8":
                return _Int8Linear(_per_channel(*_int8_rows(weight.t().float().contiguous())), b)
            if quantize == "fp16":
                return _Fp16Linear(weight, b)
            return _Linear(weight, b).to(device, dtype)

        # Two loader threads: reading, quantizing and packing each weight are single-threaded
        # torch calls that release the GIL (measured, GPT-2 small: float32 1.1 -> 0.9 s, int8 2.7 -> 2.0 s,
        # fp16 2.5 -> 1.6 s). The token table and LM head (the largest single weight) load alongside.
        matmuls = [f"h.{i}.{m}" for i in range(cfg.n_layer) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        tied = cfg.tied or "lm_head.weight" not in names
        with ThreadPoolExecutor(max_workers=2) as pool:
            table_and_head = pool.submit(self._table_and_head, tensors, names, tied, quantize, get)
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

    @staticmethod
    def _table_and_head(tensors: Any, names: dict[str, str], tied: bool, quantize: str, get: Any) -> tuple[Any, Any, Any]:
        """(token embedding, LM head, float token table or None) in the precision of `quantize`."""
        table, head_name = names["wte.weight"], names["wte.weight" if tied else "lm_head.weight"]
        if quantize == "int8":  # one int8 copy of the table serves the embedding and (packed) the tied head
            rows = _int8_table(tensors, table)
            head = rows if tied else _int8_table(tensors, head_name)
            return _Embedding(*rows), _Int8Linear(_per_channel(*head), None), None
        if quantize == "fp16":
            half = _table_in(tensors, table, torch.float16)
            return _Embedding(half), _Fp16Linear((half if tied else tensors[head_name]).t(), None), None
        wte = get("wte.weight")
        head_weight = wte if tied else get("lm_head.weight")
        return functools.partial(F.embedding, weight=wte), _Linear(head_weight.t(), None).to(wte.device, wte.dtype), wte

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
        """Hidden states after ln_f for `ids` (B, T); `key_mask` (B, S) marks real tokens among all S
        positions so far (cache + these). Padding positions attend to themselves only, so they stay finite."""
        cfg = self.cfg
        bsz, steps = ids.shape
        start = cache.length if cache is not None else 0
        total = start + steps
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        """transformers-style call for whole sequences (scoring): `.logits` for every position."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return SimpleNamespace(logits=self.logits(self.forward(input_ids, positions, mask)))


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


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _SafetensorsReader:
    """Tensors of a safetensors file, each read with plain file reads when asked for: unlike a
    memory map, the file's pages then never count towards the process's memory."""

    def __init__(self, path: Path) -> None:
        self._path = path
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            self._header = json.loads(fh.read(size))
        self._header.pop("__metadata__", None)
        self._base = 8 + size

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> list[int]:
        return list(self._header[name]["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (along its first dimension), read from the file."""
        info = self._header[name]
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buf = bytearray((stop - start) * row_bytes)
        with self._path.open("rb") as fh:
            fh.seek(self._base + info["data_offsets"][0] + start * row_bytes)
            fh.readinto(buf)
        if not buf:
            return torch.empty([0, *shape[1:]], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape([stop - start, *shape[1:]])


class _InMemory(dict):
    """Tensors already in memory, with the reader's interface."""

    def shape(self, name: str) -> list[int]:
        return list(self[name].shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self[name][start:stop]


def load_gpt2(path: Path, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str = "none") -> GPT2 | None:
    """The native model for a GPT-2 directory with safetensors weights; None when it is not one."""
    try:
        cfg = Config.from_hf(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        return None
    weights = path / "model.safetensors"
    if cfg is None or not weights.is_file():
        return None
    with _loading_memory():
        return GPT2(cfg, _SafetensorsReader(weights), device, dtype, quantize)


def from_hf_model(
    model: Any, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str = "none"
) -> GPT2 | None:
    """The native model with the weights of a transformers GPT2LMHeadModel (tiny built-in models)."""
    cfg = Config.from_hf(model.config.to_dict())
    if cfg is None:
        return None
    with _loading_memory():
        return GPT2(cfg, _InMemory({k: v.detach() for k, v in model.state_dict().items()}), device, dtype, quantize)
