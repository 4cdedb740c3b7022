"""README examples are run, so they cannot drift from the code."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _console_commands() -> list[str]:
    blocks = re.findall(r"```console\n(.*?)```", README, flags=re.S)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^python3 -m venv .*$", README, flags=re.M)
    assert len(commands) == 2, "README gives exactly two set-up commands"
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", _console_commands())
def test_readme_command_runs(cli, command, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")
    monkeypatch.chdir(tmp_path)
    stdin = None
    if "|" in command:
        producer, command = (part.strip() for part in command.split("|", 1))
        assert producer.startswith("cat ")
        stdin = (tmp_path / producer[4:]).read_text()
    args = shlex.split(command)
    assert args[0] == "aigc"
    extra = ["--model", "tiny-random"]
    if args[1] == "generate" and "--max-new-tokens" not in args:
        extra += ["--max-new-tokens", "8"]
    r = cli(*args[1:], *extra, input=stdin)
    assert r.exit_code == 0, (command, r.stderr)
    if "-o" in args:  # the records went to the file: every one a complete record
        records = [json.loads(line) for line in (tmp_path / args[args.index("-o") + 1]).read_text().splitlines()]
        assert records and all("text" in rec and "prompt" in rec for rec in records), records
    else:
        assert r.stdout.strip(), command


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    first, second = [b for b in blocks if "openai" not in b]  # the OpenAI one runs in test_server.py
    exec(compile(first, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"]
    exec(compile(second, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["a", "b"]  # each row's Finished event
    assert "b length" in "\n".join(lines)
