"""Compiled row kernels for CPU decoding with float32 activations, exact and `--quantize int8`
(kernels/rowops.c): a GPT-2 layer's layer norms, tanh-GELU and one-position attention in four
calls instead of ~15 torch calls, and an int8 model's token and position embeddings in one.

Built on first use with the system's C compiler for this machine's CPU (`-march=native`), kept in
aigc's cache (keyed by the source, the compiler and the CPU), and checked against torch's own ops
before use. Without a compiler, with `AIGC_FUSED=0`, or when building, loading or the check fails,
`row_ops()` is None and the model runs torch's ops: slower, never wrong."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aigc_cli.core.caches import cache_dir, file_identity

ABI = 4  # aigc_rowops_abi() of the source this module calls
SOURCE = Path(__file__).with_name("kernels") / "rowops.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
BUILD_TIMEOUT = 60  # seconds for the compiler; past it, torch's ops
_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float


class RowOps:
    """The compiled kernels on float32 CPU tensors. Each method checks what the C code relies on
    (dtype, device, contiguity, shapes) and raises ValueError otherwise: a wrong pointer must not
    reach it."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._ln = lib.aigc_add_layer_norm
        self._ln.argtypes, self._ln.restype = [_P, _P, _P, _P, _P, _L, _L, _F], None
        self._gelu = lib.aigc_gelu_tanh
        self._gelu.argtypes, self._gelu.restype = [_P, _L], None
        self._embed = lib.aigc_embed_int8
        self._embed.argtypes, self._embed.restype = [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L], ctypes.c_int
        self._attend = lib.aigc_attend
        self._attend.argtypes = [_P, _P, _P, _P, _P, _P, _F, _P]
        self._attend.restype = None

    def embed_int8(self, table: torch.Tensor, scale: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """table[ids] * scale[ids] + positions[pos], (rows, dim) float32: an int8 token table
        (vocab, dim) with its row scales, and float32 position embeddings (n_pos, dim). An id or
        position outside its table raises ValueError."""
        return self.embedding(table, scale, positions)(ids, pos)

    def embedding(self, table: torch.Tensor, scale: torch.Tensor, positions: torch.Tensor) -> Embedding:
        """`embed_int8` with these tables, checked once (a model's, made at load)."""
        return Embedding(self._embed, table, scale, positions)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
        """F.layer_norm(x) over the last dimension of a (rows, dim) `x`, to ~1e-6; with `residual`,
        first x += residual in place (the same bits as torch's add)."""
        return self.norm(weight, bias, eps)(x, residual)

    def norm(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Norm:
        """`layer_norm` with this weight and bias, checked once (a model's norms, made at load)."""
        return Norm(self._ln, weight, bias, eps)

    def stream(self, x: torch.Tensor) -> Stream:
        """A step's residual stream `x`, checked once, for `Stream.norm`."""
        return Stream(x)

    def gelu_(self, x: torch.Tensor) -> torch.Tensor:
        """F.gelu(x, approximate="tanh") in place, to ~1e-6 relative."""
        if not (x.dtype is torch.float32 and x.is_contiguous() and x.is_cpu):
            raise ValueError("gelu_: x must be contiguous float32 on the CPU")
        self._gelu(x.data_ptr(), x.numel())
        return x

    def attention(self, keys: torch.Tensor, values: torch.Tensor, first: int, positions: list[int], scale: float) -> Attention:
        """One step's decode attention for the rows at slots first.. of a slot cache: `keys` and
        `values` (layers, slots, heads, capacity, head_dim), head_dim contiguous (any other strides;
        `SlotCache(layout="positions")` reads fastest), `positions` each row's new position.
        Checked here; then called once a layer. `Attention.at` moves it to the next step of the same
        rows (checking the new positions)."""
        return Attention(self._attend, keys, values, first, len(positions), scale).at(positions)


class Embedding:
    """`RowOps.embed_int8` bound to its tables: each call checks only the ids and positions."""

    def __init__(self, fn: Any, table: torch.Tensor, scale: torch.Tensor, positions: torch.Tensor) -> None:
        vocab, dim = table.shape if table.dim() == 2 else (0, 0)
        if not (table.dtype is torch.int8 and table.is_cpu and table.is_contiguous() and _floats(scale) and scale.shape == (vocab,)):
            raise ValueError("embed_int8: table must be a contiguous int8 CPU matrix, scale one float32 per row")
        if not (_floats(positions) and positions.dim() == 2 and positions.shape[1] == dim):
            raise ValueError("embed_int8: positions must be a contiguous float32 CPU matrix as wide as the table")
        self._fn, self._kept = fn, (table, scale, positions)  # alive while this holds their pointers
        self._table, self._scale, self._positions = table.data_ptr(), scale.data_ptr(), positions.data_ptr()
        self.vocab, self.dim, self.n_positions = vocab, dim, positions.shape[0]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not all(t.dtype is torch.long and t.is_cpu and t.is_contiguous() and t.dim() == 1 for t in (ids, pos)) or ids.shape != pos.shape:
            raise ValueError("embed_int8: ids and pos must be one int64 each per row")
        out = torch.empty((ids.shape[0], self.dim))
        if self._fn(self._table, self._scale, self._positions, ids.data_ptr(), pos.data_ptr(), out.data_ptr(), ids.shape[0], self.dim, self.vocab, self.n_positions) != 0:
            raise ValueError(f"embed_int8: a token id outside 0..{self.vocab - 1} or a position outside 0..{self.n_positions - 1}")
        return out


class Norm:
    """`RowOps.layer_norm` bound to one weight and bias: each call checks only its activations."""

    def __init__(self, fn: Any, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        if not (_floats(weight) and _floats(bias) and weight.dim() == 1 and weight.shape == bias.shape):
            raise ValueError("layer_norm: w and b must be contiguous float32 CPU vectors of one width")
        self._fn, self._kept = fn, (weight, bias)  # the weights stay alive while this holds their pointers
        self._w, self._b, self.dim, self.eps = weight.data_ptr(), bias.data_ptr(), weight.shape[0], eps

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not (_floats(x) and x.dim() == 2 and x.shape[1] == self.dim):
            raise ValueError("layer_norm: x must be a contiguous float32 CPU matrix, w and b its rows' width")
        if residual is not None and not (_floats(residual) and residual.shape == x.shape):
            raise ValueError("layer_norm: residual must be a contiguous float32 CPU matrix shaped like x")
        h = torch.empty_like(x)
        self._fn(x.data_ptr(), None if residual is None else residual.data_ptr(), self._w, self._b, h.data_ptr(), x.shape[0], self.dim, self.eps)
        return h


class Stream:
    """One step's residual stream `x` (rows, dim) and its normalised copy `h`, one buffer for the
    whole step: each `norm` adds a sublayer's output into x and writes h, the next matmul's input.
    x and h are checked (and h allocated) once a step, a sublayer's output at each call. Measured,
    GPT-2 small int8, one thread, 2-core AMD EPYC: checking and allocating at each of a token's 25
    layer norms took ~0.1 ms of ~8.5 (Python run cold among the streamed weights)."""

    def __init__(self, x: torch.Tensor) -> None:
        if not (_floats(x) and x.dim() == 2):
            raise ValueError("stream: x must be a contiguous float32 CPU matrix")
        self.x, self.h, self.shape = x, torch.empty_like(x), x.shape
        self._x, self._h = x.data_ptr(), self.h.data_ptr()

    def norm(self, norm: Norm, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x += residual (when given), then h = norm(x); returns h, which the next call overwrites."""
        if norm.dim != self.shape[1]:
            raise ValueError(f"stream: a layer norm of width {norm.dim} on rows of {self.shape[1]}")
        if residual is not None and not (residual.dtype is torch.float32 and residual.is_contiguous() and residual.shape == self.shape and residual.is_cpu):
            raise ValueError("stream: the residual must be a contiguous float32 CPU matrix shaped like x")
        norm._fn(self._x, None if residual is None else residual.data_ptr(), norm._w, norm._b, self._h, self.shape[0], norm.dim, norm.eps)
        return self.h


class Attention:
    """`RowOps.attention`: `GPT2._step`'s decode attention and cache write, one call a layer."""

    def __init__(self, fn: Any, keys: torch.Tensor, values: torch.Tensor, first: int, rows: int, scale: float) -> None:
        layers, slots, heads, capacity, head_dim = keys.shape if keys.dim() == 5 else (0, 0, 0, 0, 0)
        if values.shape != keys.shape or not all(t.dtype is torch.float32 and t.is_cpu and t.stride(4) == 1 for t in (keys, values)):
            raise ValueError("attention: keys and values must be float32 CPU caches of one shape, head_dim contiguous")
        if not (0 <= first and first + rows <= slots):
            raise ValueError(f"attention: rows {first}..{first + rows - 1} lie outside the cache's {slots} slots")
        ks, vs = keys.stride(), values.stride()
        self._fn, self._cache = fn, (keys, values)  # the cache stays alive while this holds its pointers
        self.positions = torch.zeros(rows, dtype=torch.long)
        self._at = self.positions.numpy()  # the same memory: a step's positions written without torch calls
        self._layout = torch.tensor([rows, heads, head_dim, ks[1], ks[2], ks[3], vs[1], vs[2], vs[3]], dtype=torch.long)
        self._positions_at, self._layout_at = self.positions.data_ptr(), self._layout.data_ptr()
        self._scores = torch.empty(heads * capacity)
        self._out = torch.empty((rows, heads * head_dim))  # every call's result: see __call__
        self._out_at, self._scores_at, self._qkv_shape = self._out.data_ptr(), self._scores.data_ptr(), (rows, 3 * heads * head_dim)
        self._k, self._v = keys.data_ptr() + first * ks[1] * 4, values.data_ptr() + first * vs[1] * 4
        self._k_layer, self._v_layer = ks[0] * 4, vs[0] * 4
        self.first, self.layers, self.rows, self.capacity, self.width, self.scale = first, layers, rows, capacity, heads * head_dim, scale

    def reads(self, values: torch.Tensor) -> bool:
        """Was this plan made on this cache's current buffers? (`SlotCache.resize` replaces its keys
        and values together, as new tensors.)"""
        return self._cache[1] is values

    def at(self, positions: list[int]) -> Attention:
        """This step's new position of each row (`positions`, a tensor, follows)."""
        if len(positions) != self.rows or not all(0 <= p < self.capacity for p in positions):
            raise ValueError(f"attention: {len(positions)} rows at positions up to {max(positions, default=0)} for a plan of {self.rows} rows in {self.capacity} positions: outside the cache")
        self._at[:] = positions
        return self

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s attention for `qkv` (rows, 3 * heads * head_dim): (rows, heads * head_dim),
        in the plan's own buffer, which the next call rewrites (the step's next matmul reads it
        first; allocating one a layer cost ~2 us each, run cold among the streamed weights)."""
        if not (0 <= layer < self.layers and qkv.dtype is torch.float32 and qkv.is_contiguous() and qkv.shape == self._qkv_shape and qkv.is_cpu):
            raise ValueError("attention: qkv must be contiguous float32 CPU rows of 3 * heads * head_dim, one per row")
        self._fn(
            qkv.data_ptr(), self._k + layer * self._k_layer, self._v + layer * self._v_layer, self._out_at,
            self._positions_at, self._layout_at, self.scale, self._scores_at,
        )  # fmt: skip
        return self._out


def _floats(t: torch.Tensor) -> bool:
    """What the C code reads through a bare pointer: contiguous float32 in CPU memory. The checks
    made at every call of a decoding step (`Stream.norm`, `Attention.__call__`, `gelu_`) spell it
    out inline instead: a function call, run cold among the streamed weights, costs more than the
    check itself."""
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


@functools.cache
def row_ops() -> RowOps | None:
    """The kernels for this machine, built once and cached; None where they are not available."""
    if os.environ.get("AIGC_FUSED", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    target = _target(compiler)
    if target.is_file():
        ops = _load(target)
        if ops is not None:
            return ops
    return _build(compiler, target)  # none yet, or one that fails to load or to check


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _target(compiler: str) -> Path:
    """Where the library for this source, compiler and CPU lives."""
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "vendor_id"))}))
    key = [SOURCE.read_bytes().hex(), ABI, FLAGS, file_identity(Path(compiler)), platform.machine(), cpu]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    return cache_dir() / "kernels" / f"rowops-{digest}.so"


def _build(compiler: str, target: Path) -> RowOps | None:
    """Compile in a temporary directory, then copy the library into the cache under a temporary
    name and rename it into place (two processes building at once each rename a whole library).
    Where the cache cannot be written, the library is loaded from the temporary directory: each
    run then pays the build (~0.3 s)."""
    with tempfile.TemporaryDirectory(prefix="aigc-rowops-") as scratch:
        built = Path(scratch) / "rowops.so"
        try:
            done = subprocess.run(
                [compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True, timeout=BUILD_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0 or not built.is_file():
            return None
        staged = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, staged)
            os.replace(staged, target)
        except OSError:
            with contextlib.suppress(OSError):
                staged.unlink()
            return _load(built)  # loaded (mapped) before the directory goes
        return _load(target)


def _load(path: Path) -> RowOps | None:
    try:
        lib = ctypes.CDLL(str(path))
        if lib.aigc_rowops_abi() != ABI:
            return None
        ops = RowOps(lib)
    except (OSError, AttributeError):
        return None
    return ops if _agrees_with_torch(ops) else None


def _agrees_with_torch(ops: RowOps) -> bool:
    """A quick check of each kernel against torch's op on random values (a miscompiled or foreign
    library must not run)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g)
    res = torch.randn(3, 40, generator=g)
    want = F.layer_norm(x + res, (40,), w, b, 1e-5)
    summed = x.clone()
    if not torch.allclose(ops.layer_norm(summed, w, b, 1e-5, res), want, atol=1e-5) or not torch.equal(summed, x + res):
        return False
    y = torch.randn(2, 50, generator=g) * 4
    if not torch.allclose(ops.gelu_(y.clone()), F.gelu(y, approximate="tanh"), atol=1e-5):
        return False
    table, scales, pe = torch.randint(-127, 128, (9, 40), generator=g, dtype=torch.int8), torch.rand(9, generator=g), torch.randn(5, 40, generator=g)
    ids, at = torch.tensor([8, 0, 3]), torch.tensor([4, 0, 2])
    if not torch.allclose(ops.embed_int8(table, scales, pe, ids, at), table[ids].float() * scales[ids, None] + pe[at], atol=1e-5):
        return False
    heads, dim, cap = 2, 8, 6
    keys = torch.randn(2, 3, cap, heads, dim, generator=g).transpose(2, 3)  # (layers, slots, heads, cap, dim), stored by position
    values = torch.randn(2, 3, heads, cap, dim, generator=g)
    qkv, pos = torch.randn(2, 3 * heads * dim, generator=g), [3, 5]
    out = ops.attention(keys, values, 1, pos, 0.5)(1, qkv)
    q, k, v = qkv.view(2, 3, heads, dim).unbind(1)
    for r, p in enumerate(pos):
        if not (torch.equal(keys[1, r + 1, :, p], k[r]) and torch.equal(values[1, r + 1, :, p], v[r])):
            return False
        ref = torch.softmax((q[r, :, None, :] * 0.5) @ keys[1, r + 1, :, : p + 1].transpose(1, 2), -1) @ values[1, r + 1, :, : p + 1]
        if not torch.allclose(out[r].view(heads, dim), ref[:, 0], atol=1e-5):
            return False
    return True
