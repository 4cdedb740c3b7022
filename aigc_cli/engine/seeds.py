"""Seeds, chosen in one place: a run's base seed (the one given, else a fresh random one) and each
(record, sequence) row's own seed derived from it, so that a row's draws never depend on batching,
sharding, resuming or which front end asked; no torch."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

FRESH_SEED_LIMIT = 2**31  # fresh seeds stay small enough to type back in


def run_seed(given: int | None) -> int:
    """The seed of a run or request: the one given, else a fresh random one (reported with the output)."""
    return given if given is not None else secrets.randbelow(FRESH_SEED_LIMIT)


def row_seed(base_seed: int, record_id: Any, index: int) -> int:
    """The seed of one (record, sequence) pair: independent of batching, sharding and resuming."""
    digest = hashlib.sha256(f"{base_seed}\x00{record_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
