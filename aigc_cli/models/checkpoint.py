"""What a model directory promises, checked before any model is built: a readable config, weights
whose tensor names and shapes are the ones the config implies, and a size that fits in memory.

A config that lies (a GPT-2 copy saying `"model_type": "llama"`) would otherwise make transformers
build a default 6.9B-parameter Llama with random weights and exhaust the machine's memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from aigc_cli.core import jsondata
from aigc_cli.core.errors import ModelUnavailableError

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MEMORY_SHARE = 0.9  # of the memory available now that a model's weights may take


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; ModelUnavailableError naming the file when it is not one."""
    f = path / "config.json"
    try:
        config = jsondata.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelUnavailableError(f"{f}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{f}: not a JSON object")
    return config


def stored_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int, str]:
    """(tensor name -> shape, bytes, file named in messages) of the directory's weights, read from
    the safetensors headers (or a .bin file loaded onto the meta device: no tensor data)."""
    index = path / "model.safetensors.index.json"
    files = [path / "model.safetensors"]
    if index.is_file():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    shapes: dict[str, tuple[int, ...]] = {}
    size = 0
    if all(f.is_file() for f in files):
        for f in files:
            with f.open("rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            header.pop("__metadata__", None)
            for name, info in header.items():
                shapes[name] = tuple(info["shape"])
                size += math.prod(info["shape"]) * _BYTES.get(info["dtype"], 4)
        return shapes, size, str(files[0] if len(files) == 1 else index)
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location="meta", weights_only=True, mmap=True)
        for name, t in state.items():
            shapes[name] = tuple(t.shape)
            size += t.numel() * t.element_size()
        return shapes, size, str(binary)
    return shapes, size, str(path)


def check_fits(what: str, size: int) -> None:
    """Refuse weights that cannot fit in the memory available now."""
    free = available_memory()
    if free is not None and size > MEMORY_SHARE * free:
        raise ModelUnavailableError(
            f"{what}: the model needs {size / 2**30:.1f} GiB for its weights, "
            f"more than the {free / 2**30:.1f} GiB of memory available"
        )


def check_matches(where: str, expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], optional: set[str]) -> None:
    """Every tensor the config implies is stored, with its shape (`optional`: tied or derived ones)."""
    stored = {_strip(k): v for k, v in stored.items()}
    missing = [k for k in expected if _strip(k) not in stored and k not in optional]
    wrong = [k for k in expected if _strip(k) in stored and tuple(stored[_strip(k)]) != tuple(expected[k])]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(expected)} tensors are missing (e.g. {missing[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} have other shapes (e.g. {k}: config {list(expected[k])}, file {list(stored[_strip(k)])})")
        raise ModelUnavailableError(f"{where}: the weights do not match config.json: {'; '.join(parts)}")


def expected_hf_shapes(config: dict[str, Any], where: str) -> tuple[dict[str, tuple[int, ...]], set[str], int]:
    """(parameter name -> shape, names that may be absent, bytes in float32) of the model transformers
    would build from this config, built on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as exc:
        raise ModelUnavailableError(f"{where}: config.json does not describe a model transformers can build ({exc})") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {name for name, _ in model.named_buffers()}
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embedding", False):
        optional |= {name for name in shapes if name.endswith("lm_head.weight")}
    size = sum(math.prod(s) * 4 for name, s in shapes.items() if name not in optional)
    return shapes, optional, size


def _strip(name: str) -> str:
    """Checkpoints name tensors with or without the base model's prefix."""
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
