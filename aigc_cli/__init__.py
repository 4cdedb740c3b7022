"""aigc: text generation with GPT-2 from the command line, and the library under it.

The Python API in one import (loaded on first use, so that `aigc --help` never pays for torch):

    from aigc_cli import Engine, GenerationSettings, Request
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "aigc_cli.engine.engine",
    "Request": "aigc_cli.engine.requests",
    "Completion": "aigc_cli.engine.requests",
    "GenerationSettings": "aigc_cli.core.settings",
    "Decoding": "aigc_cli.core.settings",
    "ModelSpec": "aigc_cli.core.modelspec",
    "Scheduler": "aigc_cli.engine.scheduler",
    "RowSpec": "aigc_cli.engine.scheduler",
    "Token": "aigc_cli.engine.scheduler",
    "Finished": "aigc_cli.engine.scheduler",
    "row_seed": "aigc_cli.engine.seeds",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aigc_cli' has no attribute {name!r}")
