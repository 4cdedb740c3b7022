"""Reading checkpoint tensors (safetensors, lazily, a tensor or a block of rows at a time) and keeping
the process's memory low while weights load."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I8": torch.int8}


class SafetensorsReader:
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

    def __contains__(self, name: object) -> bool:
        return name in self._header

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
            if fh.readinto(buf) != len(buf):
                raise OSError(f"{self._path}: truncated ({name})")
        if not buf:
            return torch.empty([0, *shape[1:]], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape([stop - start, *shape[1:]])

    def mapped(self, name: str) -> torch.Tensor:
        """A tensor backed by a private memory map of the file, for a table read a few rows at a
        time (token embeddings): only the pages of rows looked up become part of the process's
        memory, instead of the whole table. Read-only in practice: writes would stay private."""
        info = self._header[name]
        dtype, (begin, end) = _DTYPES[info["dtype"]], info["data_offsets"]
        with self._path.open("rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mm) < self._base + end:
            raise OSError(f"{self._path}: truncated ({name})")
        count = (end - begin) // dtype.itemsize
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=self._base + begin).view(info["shape"])


class InMemory(dict):
    """Tensors already in memory, with the reader's interface."""

    def shape(self, name: str) -> list[int]:
        return list(self[name].shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self[name][start:stop]


@contextlib.contextmanager
def loading_memory() -> Iterator[None]:
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
