"""Shared fixtures: tiny models built in-process, an isolated environment, a CLI runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aigc_cli.frontends.cli.app import app


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the user's model choice, colour settings or Hugging Face cache."""
    for var in ("AIGC_MODEL", "AIGC_DEBUG", "NO_COLOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_lm():
    from aigc_cli.models.loading import load

    return load("tiny-random")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a local model directory (config, safetensors, tokenizer files)."""
    from aigc_cli.models.tiny import build_tiny

    model, tokenizer = build_tiny()
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-random with its end-of-text made the greedy choice wherever the model would begin a new
    line (its head's end-of-text row, token 256, is 1.01 times the newline row, token 10): items
    after which the model's next token is end-of-text, which the built-in model almost never
    generates."""
    import torch

    from aigc_cli.models.tiny import build_tiny

    model, tokenizer = build_tiny()
    with torch.no_grad():
        model.lm_head.weight[256] = model.lm_head.weight[10] * 1.01
    path = tmp_path_factory.mktemp("eos-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Cli:
    """Runs the Typer app in-process; stdout and stderr are kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None):
        return self.runner.invoke(app, list(args), input=input, env=env)

    def jsonl(self, *args: str, input: str | None = None) -> list[dict]:
        result = self(*args, "--format", "jsonl", input=input)
        assert result.exit_code == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def cli() -> Cli:
    return Cli()


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
