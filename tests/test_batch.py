"""Batch jobs: files and stdin in, ordered JSONL out; error records, invariance, resume, shards, signals."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_cli.jobs.batch import BatchJob
from aigc_cli.jobs.records import InputFormat, read_records
from aigc_cli.frontends.cli.render import Messages, Streams
from aigc_cli.core.settings import GenerationSettings

TINY = ("--model", "tiny-random")
WORDS = "the of and to in is was he for it with as his on be at by had are but from or have an they".split()


def _prompts(n: int) -> list[str]:
    """Prompts of varied lengths, so length bucketing reorders them inside batches."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 13)) for i in range(n)]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _strip(recs: list[dict]) -> list[tuple]:
    return [(r["id"], r.get("index"), r.get("text"), r.get("error", {}).get("code")) for r in recs]


def test_lines_file_in_input_order_with_line_number_ids(cli, tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(20))
    r = cli("generate", "-f", str(f), "--max-new-tokens", "6", "--batch-size", "3", "-n", "2", "--seed", "1", *TINY)
    assert r.exit_code == 0, r.stderr
    recs = _records(r.stdout)  # auto format is JSONL for files
    assert [(x["id"], x["index"]) for x in recs] == [(i, j) for i in range(1, 21) for j in range(2)]
    assert [x["prompt"] for x in recs[::2]] == _prompts(20)


def test_jsonl_records_with_overrides(cli, tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "Hello there", "n": 3}),
        json.dumps({"id": "b", "prompt": "Hello there", "max_new_tokens": 2}),
        json.dumps({"id": "c", "prompt": "Hello there", "seed": 99, "temperature": 0.5, "top_p": 0.9, "top_k": 7}),
        json.dumps({"id": "d", "prompt": "Hello there", "stop": ["e", "a"]}),
    ]
    f = _write(tmp_path / "p.jsonl", lines)
    recs = _records(cli("generate", "-f", str(f), "--max-new-tokens", "20", "--seed", "4", *TINY).stdout)
    by_id = {}
    for x in recs:
        by_id.setdefault(x["id"], []).append(x)
    assert [x["index"] for x in by_id["a"]] == [0, 1, 2]
    assert by_id["b"][0]["completion_tokens"] <= 2
    c = by_id["c"][0]
    assert c["seed"] == 99 and c["settings"]["seed"] == 4
    assert (c["settings"]["temperature"], c["settings"]["top_p"], c["settings"]["top_k"]) == (0.5, 0.9, 7)
    d = by_id["d"][0]
    assert "e" not in d["text"] and "a" not in d["text"]
    assert by_id["a"][0]["settings"]["num_sequences"] == 3


def test_error_records_for_every_bad_kind_and_the_job_goes_on(cli, tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "fine"}).encode()
    f.write_bytes(
        b"\n".join(
            [
                good,
                json.dumps({"prompt": ""}).encode(),
                json.dumps({"prompt": "x" * 40, "max_new_tokens": 1000}).encode(),
                b'{"prompt": "caf\xe9"}',
                b'{"prompt": "unclosed',
                json.dumps({"prompt": "p", "top_p": 3}).encode(),
                json.dumps({"prompt": "p", "n": "two"}).encode(),
                json.dumps({"no_prompt": 1}).encode(),
                json.dumps([1, 2]).encode(),
                b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep for the JSON parser
                good,
            ]
        )
        + b"\n"
    )
    r = cli("generate", "-f", str(f), "--max-new-tokens", "3", *TINY)
    assert r.exit_code == 4, r.stderr
    recs = _records(r.stdout)
    codes = [x.get("error", {}).get("code") for x in recs]
    assert codes == [
        None,
        "empty_prompt",
        "prompt_too_long",
        "invalid_utf8",
        "malformed_json",
        "bad_override",
        "bad_override",
        "missing_prompt",
        "malformed_json",
        "malformed_json",
        None,
    ]
    # the id is the record's own (its line number when it has none), null when it cannot be read
    assert [x["id"] for x in recs] == [1, 2, 3, None, None, 6, 7, 8, None, None, 11]
    for x in recs:
        if "error" in x:
            assert x["error"]["message"].startswith(f"line {x['line']}")
    assert "40 tokens" in recs[2]["error"]["message"] and "1024" in recs[2]["error"]["message"]
    assert "'top_p'" in recs[5]["error"]["message"]
    assert "nested too deeply" in recs[9]["error"]["message"]
    assert "9 of 11 records" in r.stderr


def test_strict_stops_at_the_first_bad_record_keeping_what_is_done(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one", "two", "", "four"])
    out = tmp_path / "out.jsonl"
    r = cli("generate", "-f", str(f), "-o", str(out), "--strict", "--max-new-tokens", "3", *TINY)
    assert r.exit_code == 2
    assert "line 3" in r.stderr and "empty" in r.stderr
    assert [x["id"] for x in _records(out.read_text())] == [1, 2]


def test_template_renders_fields_and_a_missing_field_is_an_error_record(cli, tmp_path):
    tmpl = tmp_path / "t.txt"
    tmpl.write_text("Q: $question\nA ($lang):")
    f = _write(tmp_path / "p.jsonl", [json.dumps({"question": "why?", "lang": "en"}), json.dumps({"question": "how?"})])
    r = cli("generate", "-f", str(f), "--template", str(tmpl), "--max-new-tokens", "3", *TINY)
    recs = _records(r.stdout)
    assert recs[0]["prompt"] == "Q: why?\nA (en):"
    assert recs[1]["error"]["code"] == "template_field" and "$lang" in recs[1]["error"]["message"]
    assert r.exit_code == 4


@pytest.mark.parametrize("decoding", [["--decoding", "greedy"], ["--top-k", "0"], ["--decoding", "contrastive"]])
def test_batch_size_does_not_change_any_record(cli, tmp_path, decoding):
    f = _write(tmp_path / "p.txt", _prompts(17))
    runs = []
    for bs in ("1", "3", "16"):
        r = cli("generate", "-f", str(f), "--max-new-tokens", "8", "--batch-size", bs, "--seed", "7", *TINY, *decoding)
        assert r.exit_code == 0, r.stderr
        runs.append(_strip(_records(r.stdout)))
    assert runs[0] == runs[1] == runs[2]


def test_auto_batches_stay_within_the_kv_budget(tiny_lm, monkeypatch):
    """`--batch-size auto` runs up to 64 rows, fewer when their KV cache at full length would pass
    the budget (the KV slots allocated stay within it too); the records are those of fixed-size batches."""
    from aigc_cli.engine import engine
    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.engine.scheduler import Scheduler

    eng = Engine(tiny_lm)
    settings = GenerationSettings(max_new_tokens=6, seed=5).resolved()
    prompts = sorted(_prompts(20), key=len)  # short prompts first: more of them fit
    requests = [Request(i, p, settings, 5) for i, p in enumerate(prompts)]
    longest = max(len(eng.encode(p, settings)) for p in prompts)
    per_position = eng.lm.model.kv_bytes_per_position()
    budget = per_position * (longest + 6) * 3  # three rows of the longest prompt
    monkeypatch.setattr(engine, "AUTO_KV_BUDGET", budget)
    running = []
    real = Scheduler._admit

    def spy(self):
        joining = real(self)
        rows = len(self.live) + len(joining)
        if rows:
            slots, positions = self.slots.capacity
            longest = max(len(x.spec.prompt_ids) + x.spec.settings.max_new_tokens for x in self.live) if self.live else 0
            longest = max([longest, *(len(j.prompt_ids) + j.settings.max_new_tokens for j in joining)])
            running.append((rows, longest, slots * positions))
        return joining

    monkeypatch.setattr(Scheduler, "_admit", spy)
    auto = [(c.id, c.text) for c in eng.generate(requests)]
    assert all(rows * reserve * per_position <= budget for rows, reserve, _ in running), running
    assert all(allocated * per_position <= budget for *_, allocated in running), running
    assert max(rows for rows, *_ in running) > 3, running  # short rows: more of them at once
    assert min(rows for rows, reserve, _ in running if reserve == longest + 6) <= 3, running
    running.clear()
    fixed = [(c.id, c.text) for c in eng.generate(requests, batch_size=4)]
    assert max(rows for rows, *_ in running) == 4
    assert auto == fixed


def test_deterministic_mode_matches_batched(cli, tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(6))
    args = ("generate", "-f", str(f), "--max-new-tokens", "6", "--seed", "2", "-n", "2", *TINY)
    assert _strip(_records(cli(*args).stdout)) == _strip(_records(cli(*args, "--deterministic").stdout))


def test_shards_concatenate_to_the_full_run(cli, tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(11))
    args = ("generate", "-f", str(f), "--max-new-tokens", "5", "--seed", "3", *TINY)
    full = _strip(_records(cli(*args).stdout))
    parts = [_strip(_records(cli(*args, "--shard", f"{i}/3").stdout)) for i in range(3)]
    assert sorted(itertools.chain(*parts)) == sorted(full)
    assert all(parts) and sum(len(p) for p in parts) == len(full)
    assert [x[0] for x in parts[1]] == [2, 5, 8, 11]


@pytest.mark.parametrize("shard", ["3/3", "x", "1/0", "-1/2"])
def test_bad_shard(cli, shard):
    r = cli("generate", "hi", "--shard", shard, *TINY)
    assert r.exit_code == 2 and "--shard" in r.stderr


def test_stdin_dash_and_piped_stdin(cli):
    a = cli("generate", "-", "--max-new-tokens", "4", "--seed", "1", *TINY, input="one\ntwo\n")
    b = cli("generate", "--max-new-tokens", "4", "--seed", "1", *TINY, input="one\ntwo\n")
    c = cli("generate", "-f", "-", "--max-new-tokens", "4", "--seed", "1", *TINY, input="one\ntwo\n")
    assert a.exit_code == 0 and _strip(_records(a.stdout)) == _strip(_records(b.stdout)) == _strip(_records(c.stdout))
    assert [x["prompt"] for x in _records(a.stdout)] == ["one", "two"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a", "-f", "x.txt"], "-f/--file"),
        (["generate", "-f", "/no/such/file.txt"], "no such file"),
        (["generate", "a", "-"], "'-'"),
        (["generate", "a", "--resume"], "--resume"),
        (["generate", "a", "--batch-size", "0"], "--batch-size"),
        (["generate", "a", "--template", "t.txt"], "--template"),
    ],
)
def test_bad_batch_flags(cli, args, message):
    r = cli(*args, *TINY)
    assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_reading_is_lazy_and_memory_bounded(tiny_lm):
    """An endless input: the job reads it a few batches ahead of what is written, never whole."""
    from aigc_cli.engine.engine import Engine

    class Endless(io.RawIOBase):
        def __init__(self):
            self.served = 0

        def readable(self):
            return True

        def readinto(self, buf):
            line = b"prompt %d\n" % self.served
            self.served += 1
            buf[: len(line)] = line
            return len(line)

    raw = Endless()
    stream = io.BufferedReader(raw, buffer_size=64)

    emitted = []

    class Enough(Exception):
        pass

    def emit(item):
        emitted.append(item)
        if len(emitted) == 50:
            raise Enough

    job = BatchJob(Engine(tiny_lm), GenerationSettings(seed=1, max_new_tokens=2).resolved(), emit, batch_size=4)
    with pytest.raises(Enough):
        job.run(read_records(stream, InputFormat.auto))
    assert [e.id for e in emitted] == list(range(1, 51))
    assert raw.served < 200  # read ahead by at most a window and a buffer


def test_auto_format_detection():
    recs = list(read_records(io.BytesIO(b'\n{"prompt": "a", "id": 7}\n\n{"prompt": "b"}\n'), InputFormat.auto))
    assert [(r.id, r.prompt) for r in recs] == [(7, "a"), (4, "b")]
    recs = list(read_records(io.BytesIO(b"{not json\nplain\n"), InputFormat.auto))
    assert [r.prompt for r in recs] == ["{not json", "plain"]


def test_progress_bar_goes_to_stderr_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Tty()
    messages = Messages(Streams(stdout=out, stderr=err))
    with messages.progress(10) as update:
        update(5, 100)
        print("record", file=out)  # stdout is not redirected through the bar
    assert out.getvalue() == "record\n"
    assert "prompts" in err.getvalue() and "5/10" in err.getvalue()


# --- subprocess tests: resume after kill -9, SIGTERM, broken pipe, inherited stdin ------------


def _aigc(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("aigc")
    return [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "aigc_cli"]), *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("AIGC_MODEL", "NO_COLOR", "AIGC_DEBUG")}


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before {n} lines: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for output")


def test_resume_after_kill_gives_exactly_the_uninterrupted_records(tmp_path):
    # the default --batch-size: records must reach the file while the job runs, not at its end
    f = _write(tmp_path / "p.txt", _prompts(150))
    common = ("-f", str(f), "--max-new-tokens", "40", "-n", "2", "--seed", "11", *TINY)
    full = tmp_path / "full.jsonl"
    subprocess.run(_aigc("generate", *common, "-o", str(full)), check=True, env=_env(), timeout=300)

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(_aigc("generate", *common, "-o", str(out)), env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 3, proc)
    proc.kill()
    proc.wait()
    with out.open("ab") as fh:  # as if killed in the middle of a write
        fh.write(b'{"id": 99, "index": 0, "prompt": "half-writ')
    assert out.read_bytes().count(b"\n") < full.read_bytes().count(b"\n")
    done = subprocess.run(_aigc("generate", *common, "-o", str(out), "--resume"), env=_env(), timeout=300, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == full.read_bytes()
    again = subprocess.run(_aigc("generate", *common, "-o", str(out), "--resume"), env=_env(), timeout=300)
    assert again.returncode == 0 and out.read_bytes() == full.read_bytes()  # nothing left: no duplicates


def test_resume_without_seed_reuses_the_files_seed_and_refuses_other_settings(cli, tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(4))
    out = tmp_path / "out.jsonl"
    assert cli("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "4", *TINY).exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")
    assert cli("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "4", "--resume", *TINY).exit_code == 0
    assert out.read_text().splitlines() == lines
    out.write_text("\n".join(lines[:2]) + "\n")
    r = cli("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "5", "--resume", *TINY)
    assert r.exit_code == 2 and "other settings" in r.stderr


def test_sigterm_flushes_and_says_how_to_resume(tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(200))
    out = tmp_path / "out.jsonl"
    args = ("-f", str(f), "--max-new-tokens", "60", "--seed", "1", *TINY, "-o", str(out))
    proc = subprocess.Popen(_aigc("generate", *args), env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert out.read_text().endswith("\n")  # only whole records


def test_broken_pipe_exits_promptly_without_traceback(tmp_path):
    f = _write(tmp_path / "big.txt", _prompts(400))
    started = time.time()
    done = subprocess.run(
        f"{' '.join(_aigc('generate', '-f', str(f), '--format', 'jsonl', '--max-new-tokens', '4', *TINY))} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
    assert time.time() - started < 60


def test_prompt_arguments_never_wait_on_an_inherited_stdin():
    proc = subprocess.Popen(
        _aigc("generate", "hello", "--max-new-tokens", "3", *TINY, "--format", "jsonl"),
        stdin=subprocess.PIPE,  # open and never written or closed
        stdout=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert json.loads(proc.stdout.readline())["prompt"] == "hello"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def _stderr_on_a_terminal(args: list[str], tmp_path: Path) -> tuple[str, str]:
    """Run aigc with stderr on a pseudo-terminal and stdout to a file; return (stdout, stderr)."""
    import pty

    master, slave = pty.openpty()
    out = tmp_path / "stdout.txt"
    with out.open("w") as fh:
        proc = subprocess.Popen(_aigc(*args), stdout=fh, stderr=slave, stdin=subprocess.DEVNULL, env=_env())
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=120)
    os.close(master)
    return out.read_text(), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_for_files_only(tmp_path):
    f = _write(tmp_path / "p.txt", _prompts(3))
    stdout, stderr = _stderr_on_a_terminal(["generate", "-f", str(f), "--max-new-tokens", "3", *TINY], tmp_path)
    assert "prompts" in stderr and "3/3" in stderr
    assert len(_records(stdout)) == 3  # stdout holds the records only
    stdout, stderr = _stderr_on_a_terminal(["generate", "hello", "--max-new-tokens", "3", *TINY], tmp_path)
    assert "prompts" not in stderr and "Sequence 1" in stdout
