"""aigc's cache directory and the identity of the files its derived caches are keyed by; no torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """aigc's own cache: $XDG_CACHE_HOME/aigc, else ~/.cache/aigc."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aigc"


def file_identity(path: Path) -> list[Any]:
    """What cache entries derived from a file are keyed by: its real path, size and mtime."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]
