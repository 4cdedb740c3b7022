"""The model argument, parsed once: which model (a Hub id, a local directory, a built-in tiny
model), on which device, in which precision. Every layer receives this frozen spec; where the name
resolves (cache, disk, Hub) is decided by the models layer, which is the only one that looks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from aigc_cli.core.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8", "fp16")
BUILTIN = ("tiny-random", "tiny-random-zh")
DEFAULT_MODEL = "gpt2"


@dataclass(frozen=True)
class ModelSpec:
    """`--model`, `--device`, `--dtype` and `--quantize`, checked."""

    name: str = DEFAULT_MODEL
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 or float16 on a GPU
    quantize: str = "none"  # CPU fast modes: int8, fp16

    @classmethod
    def parse(cls, name: str | None, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> ModelSpec:
        """UsageError naming the flag for a value outside its choices or a name that cannot be one."""
        for value, allowed, flag in ((device, DEVICES, "--device"), (dtype, DTYPES, "--dtype"), (quantize, QUANTIZE, "--quantize")):
            if value not in allowed:
                raise UsageError(f"{flag}: must be one of {', '.join(allowed)} (got {value!r})")
        name = DEFAULT_MODEL if name is None else name
        if not name.strip():
            raise UsageError("--model: must not be empty")
        if any("\ud800" <= ch <= "\udfff" for ch in name) or "\0" in name:
            raise UsageError(f"--model: not a valid model name or path ({name!r})")
        return cls(name, device, dtype, quantize)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def looks_like_path(self) -> bool:
        """Written as a path (./x, /x, ~/x, a/b/c), so never a Hub id."""
        n = self.name
        return n.startswith((".", "/", "~")) or os.sep in n.strip("/") and n.count("/") > 1

    @property
    def defaults(self) -> bool:
        """Device, dtype and precision left to the machine (what a remote server decides for itself)."""
        return (self.device, self.dtype, self.quantize) == ("auto", "auto", "none")
