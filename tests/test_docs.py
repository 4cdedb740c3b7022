"""Every example in README.md and docs/*.md runs, so the documentation cannot drift from the code.

Each fenced block of a page is one of:
- ```console: every `$ aigc ...` line (optionally `cat FILE | aigc ...`, `VAR=value aigc ...`,
  `aigc ... > FILE`) runs in-process with Typer's CliRunner; it must exit 0, or with the code its
  `# exit N` comment states, and print something (or write its -o / > file).
- ```python: executed in-process (an OpenAI-client example against a live `aigc serve`).
- ```bash: run by bash, for real; `aigc serve` is started in the background and stopped with
  SIGTERM at the end of the block, which must exit 0.
- a block right after `<!-- file: NAME -->`: a file that the other examples of its page read.
- a block right after `<!-- not run: REASON -->`: shown only, for the reason given.
Any other block fails `test_every_block_runs_or_says_why`.

Examples run in a fresh directory holding a copy of prompts/, the files of FILES and the page's
file blocks. What the test changes in an example before running it is in SUBSTITUTIONS, ENV and
FILES below, and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNS = ("console", "python", "bash")
HANZI = re.compile(r"[\u4e00-\u9fff]")


# -- what differs from the documentation, in one place -----------------------------------------------


@dataclass(frozen=True)
class Sub:
    """A regex replacement applied to an example (a console line, or a whole python or bash block)
    of the kinds in `kinds`, before it runs. In `new`, {model} is the built-in model of the example
    (tiny-random-zh where it holds hanzi, else tiny-random) and {url} a live server's address."""

    old: str
    new: str
    why: str
    kinds: tuple[str, ...] = RUNS


SUBSTITUTIONS: tuple[Sub, ...] = (
    Sub(
        r'(--model |"model": "|model="|Engine\.load\(")(?:gpt2|/shared/models/gpt2|uer/gpt2-chinese-[\w-]+|\./gpt2-chinese-[\w-]+)(?![\w/-])',
        r"\g<1>{model}",
        "the Hub is out of reach in tests: the built-in model instead of a download",
    ),
    Sub(
        r"^((?:cat \S+ \| )?aigc generate\b(?!.*--max-new-tokens).*?)(\s*(?:[>#].*)?)$",
        r"\1 --max-new-tokens 8\2",
        "8 new tokens instead of 50 show as much and keep the test fast",
        ("console",),
    ),
    Sub(r"http://127\.0\.0\.1:8000", "{url}", "the test's server, on a free port", ("python",)),
    Sub(r"--port 8000\b", "--port 0", "a free port, which the server prints on stderr", ("bash",)),
    Sub(r"127\.0\.0\.1:8000\b", "127.0.0.1:$PORT", "the port the server picked", ("bash",)),
    Sub(r"^pip install .*$", ":", "the test environment has the extras already (and no network)", ("bash",)),
    Sub(
        r"^aigc serve\b",
        "serve_in_background",
        "started in the background and waited for (/health); stopped with SIGTERM when the block ends",
        ("bash",),
    ),
    Sub(r"--epochs 3\b|--steps 500\b", "--steps 2", "two optimizer steps on the small corpus of FILES", ("bash",)),
    Sub(r"--block-size 256\b", "--block-size 32", "blocks the small corpus can fill", ("bash",)),
    Sub(r"--sample-every \d+", "--sample-every 1", "a sample within the two steps", ("bash",)),
)
# The environment of every example: the default model (gpt2) needs the Hub.
ENV = {"AIGC_MODEL": "{model}"}
UNSET = ("AIGC_SERVER", "AIGC_API_KEY", "RAY_ADDRESS")
# Data the examples read that the pages do not show (besides a copy of prompts/).
_WORDS = "the moon rises over quiet water and the night wind sings of distant silver shores".split()
FILES = {
    "poems.txt": "\n\n".join(" ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(40)) for i in range(24)) + "\n",
    "lines.txt": "".join(f"Our coffee is {w} and warm\n" for w in _WORDS * 3),
}


def model_for(text: str) -> str:
    return "tiny-random-zh" if HANZI.search(text) else "tiny-random"


def substituted(text: str, kind: str, **values: str) -> str:
    for sub in SUBSTITUTIONS:
        if kind in sub.kinds:
            text = re.sub(sub.old, sub.new.replace("{model}", values["model"]).replace("{url}", values.get("url", "")), text, flags=re.M)
    return text


def example_env(model: str) -> dict[str, str]:
    return {k: v.replace("{model}", model) for k, v in ENV.items()}


# -- the pages' blocks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str
    text: str
    note: tuple[str, str] | None  # ("not run", reason) or ("file", name), from the comment right before

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.note is None and self.kind in RUNS


FENCE = re.compile(r"^```(\S*)\n(.*?)^```[ \t]*$", re.M | re.S)
NOTE = re.compile(r"^<!--\s*(not run|file):\s*(.*?)\s*-->$")


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        note = NOTE.match(before[-1].strip()) if before else None
        line = text.count("\n", 0, m.start()) + 1
        found.append(Block(page, line, m.group(1), m.group(2), (note.group(1), note.group(2)) if note else None))
    return found


BLOCKS = [b for page in PAGES for b in page_blocks(page)]


def workdir(tmp: Path, block: Block) -> Path:
    """A copy of prompts/, FILES and the page's file blocks: what the examples read."""
    shutil.copytree(ROOT / "prompts", tmp / "prompts")
    for name, content in FILES.items():
        (tmp / name).write_text(content, encoding="utf-8")
    for b in page_blocks(block.page):
        if b.note is not None and b.note[0] == "file":
            (tmp / b.note[1]).write_text(b.text, encoding="utf-8")
    return tmp


# -- the checks ----------------------------------------------------------------------------------------


def test_every_block_runs_or_says_why():
    problems = []
    for b in BLOCKS:
        if b.note is None and b.kind not in RUNS:
            problems.append(f"{b.id}: a ```{b.kind} block that neither runs nor has <!-- not run: REASON -->")
        elif b.note is not None and not b.note[1]:
            problems.append(f"{b.id}: <!-- {b.note[0]}: --> needs a reason or a file name")
        elif b.note is not None and b.note[0] == "file":
            if not any(b.note[1] in other.text for other in page_blocks(b.page) if other.runs):
                problems.append(f"{b.id}: the file {b.note[1]} is read by no example of its page")
    assert not problems, "\n".join(problems)
    assert sum(b.runs for b in BLOCKS) >= 25, "the pages lost their examples"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runs and b.kind == "console"], ids=lambda b: b.id)
def test_console_example(block, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir(tmp_path, block))
    lines = block.text.replace("\\\n", "").splitlines()
    commands = [line[2:] for line in lines if line.startswith("$ ")]
    assert commands, f"{block.id}: a console block without `$ ` lines"
    for command in commands:
        _run_console(cli, tmp_path, block, command)


def _run_console(cli, work: Path, block: Block, command: str) -> None:
    model = model_for(command)
    line = substituted(command, "console", model=model)
    wanted = re.search(r"#\s*exit (\d+)\s*$", line)
    args = shlex.split(line, comments=True)
    env = example_env(model)
    while args and re.fullmatch(r"[A-Z_]+=.*", args[0]):
        key, value = args.pop(0).split("=", 1)
        env[key] = value
    stdin = None
    if "|" in args:
        producer, args = args[: args.index("|")], args[args.index("|") + 1 :]
        assert producer[0] == "cat" and len(producer) == 2, f"{block.id}: only `cat FILE |` may feed an example"
        stdin = (work / producer[1]).read_text(encoding="utf-8")
    redirect = None
    if ">" in args:
        at = args.index(">")
        redirect, args = work / args[at + 1], args[:at] + args[at + 2 :]
    assert args[0] == "aigc", f"{block.id}: `$ {command}` is not an aigc command"
    r = cli(*args[1:], input=stdin, env=env)
    code = int(wanted.group(1)) if wanted else 0
    shown = f"{block.id}: `$ {command}` ran as `{line}`\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    assert r.exit_code == code, shown
    if code != 0:
        assert r.stderr.strip(), shown  # the error said why
    elif redirect is not None:
        redirect.write_text(r.stdout, encoding="utf-8")
        assert r.stdout.strip(), shown
    elif "-o" in args:
        records = [json.loads(x) for x in (work / args[args.index("-o") + 1]).read_text(encoding="utf-8").splitlines()]
        assert records and all("text" in rec and "prompt" in rec for rec in records), shown
    else:
        assert r.stdout.strip(), shown


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`aigc serve --model tiny-random --port 0`, for the python examples that are clients."""
    from tests.serving import Server

    s = Server(tmp_path_factory.mktemp("docs-serve"), key=None)
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runs and b.kind == "python"], ids=lambda b: b.id)
def test_python_example(block, tmp_path, monkeypatch, request):
    monkeypatch.chdir(workdir(tmp_path, block))
    url = request.getfixturevalue("server").url if "127.0.0.1:8000" in block.text else ""
    code = substituted(block.text, "python", model=model_for(block.text), url=url)
    exec(compile(code, block.id, "exec"), {"__name__": "__docs__"})


BASH_PRELUDE = r"""
set -euo pipefail
aigc() { "$AIGC_PYTHON" -m aigc_cli "$@"; }
serve_in_background() {
    "$AIGC_PYTHON" -m aigc_cli serve "$@" 2>>serve.log &
    SERVE_PID=$!
    trap 'status=$?; kill -TERM $SERVE_PID; wait $SERVE_PID || status=$?; exit $status' EXIT
    PORT=$("$AIGC_PYTHON" -c "$AIGC_WAIT_READY" serve.log $SERVE_PID)
}
"""
# Prints the port of the server whose stderr is argv[1] (pid argv[2]) once /health answers 200.
WAIT_READY = r"""
import os, re, sys, time, urllib.request
log, pid, deadline, port = sys.argv[1], int(sys.argv[2]), time.monotonic() + 60, None
while time.monotonic() < deadline:
    os.kill(pid, 0)  # still running, else this raises and the block fails
    found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", open(log).read())
    port = port or (found and found.group(1))
    try:
        if port and urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
            print(port)
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit("the server did not get ready: " + open(log).read())
"""


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runs and b.kind == "bash"], ids=lambda b: b.id)
def test_bash_example(block, tmp_path):
    if "curl " in block.text and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    if "--backend ray" in block.text:
        pytest.importorskip("ray")
    work = workdir(tmp_path, block)
    model = model_for(block.text)
    script = BASH_PRELUDE + substituted(block.text, "bash", model=model)
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(example_env(model), AIGC_PYTHON=sys.executable, AIGC_WAIT_READY=WAIT_READY)
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    log = (work / "serve.log").read_text() if (work / "serve.log").exists() else ""
    shown = f"{block.id} ran as:\n{script}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}\nserver: {log[-2000:]}"
    assert r.returncode == 0, shown
    outputs = re.findall(r"-o (\S+)", block.text)
    assert r.stdout.strip() or outputs, shown
    for out in outputs:
        assert (work / out).exists(), shown


# -- the README's own promises, and what the pages say about the code --------------------------------


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8")) <= 8000


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^python3 -m venv .*$", README.read_text(encoding="utf-8"), flags=re.M)
    assert len(commands) == 2, "README gives exactly two set-up commands"
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_settings_table_is_the_registry():
    from aigc_cli.core.settings import REGISTRY

    text = (ROOT / "docs" / "generate.md").read_text(encoding="utf-8")
    table = text.split("## Every setting on every surface", 1)[1].split("\n\n", 3)[2]
    rows = [[cell.strip().strip("`") for cell in row.strip("|").split("|")[:3]] for row in table.splitlines()[2:]]
    assert rows == [[s.label("cli"), s.param, s.key] for s in REGISTRY]


def test_the_architecture_page_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "aigc_cli").rglob("*.py") if p.name != "__init__.py" or p.parent.name == "aigc_cli")
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and anchor not in _anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
