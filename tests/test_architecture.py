"""The layers hold: import-linter's contracts in pyproject.toml (front ends > applications and
protocol > jobs > engine > models > core; the CLI above the server, the client and Ray, which never
import each other; no torch, transformers or HTTP framework in the core or the protocol)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_every_module_says_what_it_is_for():
    import ast

    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "aigc_cli").rglob("*.py"))
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not missing, f"modules without a purpose docstring: {missing}"
