"""Data safety and hostile input: the output file, concurrent runs, full disks, ids, encodings."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

TINY = ("--model", "tiny-random")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
def test_output_equal_to_the_input_is_refused_and_the_input_kept(cli, tmp_path, monkeypatch, how):
    f = _write(tmp_path / "p.txt", ["one", "two"])
    before = f.read_bytes()
    target = {"same": f, "symlink": tmp_path / "link.txt", "hardlink": tmp_path / "hard.txt", "relative": Path("p.txt")}[how]
    if how == "symlink":
        target.symlink_to(f)
    if how == "hardlink":
        os.link(f, target)
    monkeypatch.chdir(tmp_path)
    r = cli("generate", "-f", str(f), "-o", str(target), "--max-new-tokens", "2", "--model", "no/such-model-anywhere")
    assert r.exit_code == 2, r.stderr  # a usage error, found before the model is even looked up
    assert "same file as the input" in r.stderr and "--output" in r.stderr
    assert f.read_bytes() == before


def test_output_equal_to_stdin_is_refused(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one", "two"])
    before = f.read_bytes()
    with f.open("rb") as stdin:
        os_stdin = os.dup(0)
        try:
            os.dup2(stdin.fileno(), 0)
            r = cli("generate", "-", "-o", str(f), *TINY)
        finally:
            os.dup2(os_stdin, 0)
            os.close(os_stdin)
    assert r.exit_code == 2 and "standard input" in r.stderr, r.stderr
    assert f.read_bytes() == before


def test_a_second_writer_of_the_same_output_is_refused_naming_the_first(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one"])
    out = tmp_path / "out.jsonl"
    out.write_text('{"kept": true}\n')
    with out.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running aigc holds it
        r = cli("generate", "-f", str(f), "-o", str(out), *TINY)
    assert r.exit_code == 2, r.stderr
    assert f"process {os.getpid()}" in r.stderr and "--output" in r.stderr
    assert out.read_text() == '{"kept": true}\n'  # the other run's work is untouched
    assert cli("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "2", *TINY).exit_code == 0  # free again


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_names_the_file_without_a_traceback(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one", "two"])
    r = cli("generate", "-f", str(f), "-o", "/dev/full", "--max-new-tokens", "2", *TINY)
    assert r.exit_code == 1, r.stderr
    assert "/dev/full" in r.stderr and "No space left on device" in r.stderr
    assert "Traceback" not in r.stderr and "OSError" not in r.stderr


def test_a_full_disk_keeps_what_was_written_and_hints_resume(cli, tmp_path, monkeypatch):
    """The disk fills after the first record: exit 1, the file keeps that record, --resume completes it."""
    from aigc_cli import outfile

    f = _write(tmp_path / "p.txt", ["one", "two", "three"])
    out = tmp_path / "out.jsonl"
    args = ("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "3", "--seed", "4", *TINY)
    real = os.write
    writes = []

    def failing(fd, data):
        writes.append(fd)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(outfile.os, "write", failing)
    r = cli(*args)
    monkeypatch.setattr(outfile.os, "write", real)
    assert r.exit_code == 1 and "No space left" in r.stderr and "--resume" in r.stderr, r.stderr
    assert len(_records(out.read_text())) == 1
    assert cli(*args, "--resume").exit_code == 0
    full = tmp_path / "full.jsonl"
    assert cli(*args[:4], str(full), *args[5:]).exit_code == 0
    assert out.read_text() == full.read_text()


def test_an_unwritable_output_fails_before_the_model_loads(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one"])
    r = cli("generate", "-f", str(f), "-o", str(tmp_path / "no" / "dir" / "out.jsonl"), "--model", "no/such-model-anywhere")
    assert r.exit_code == 2 and "--output" in r.stderr and "cannot open" in r.stderr, r.stderr
    r = cli("generate", "-f", str(f), "-o", str(tmp_path), "--model", "no/such-model-anywhere")
    assert r.exit_code == 2 and "is a directory" in r.stderr, r.stderr


def test_a_failed_model_load_leaves_the_old_output_alone(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one"])
    out = tmp_path / "out.jsonl"
    out.write_text('{"earlier": "work"}\n')
    r = cli("generate", "-f", str(f), "-o", str(out), "--model", str(tmp_path / "missing-model"))
    assert r.exit_code == 3, r.stderr
    assert out.read_text() == '{"earlier": "work"}\n'


def test_read_only_output_with_resume_is_a_usage_error(cli, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes read-only files")
    f = _write(tmp_path / "p.txt", ["one"])
    out = tmp_path / "out.jsonl"
    out.write_text("")
    out.chmod(0o444)
    r = cli("generate", "-f", str(f), "-o", str(out), "--resume", *TINY)
    assert r.exit_code == 2 and "cannot open for writing" in r.stderr


def test_duplicate_ids_are_error_records_and_resume_still_works(cli, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n{"id": "a", "prompt": "three"}\n{"prompt": "four"}\n'
        '{"id": 4, "prompt": "five"}\n'
    )
    out = tmp_path / "out.jsonl"
    args = ("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "2", "--seed", "1", *TINY)
    r = cli(*args)
    assert r.exit_code == 4, r.stderr
    recs = _records(out.read_text())
    assert [(x["id"], x.get("line"), x.get("error", {}).get("code")) for x in recs] == [
        ("a", None, None),
        ("b", None, None),
        ("a", 3, "duplicate_id"),
        (4, None, None),  # no id: its line number
        (4, 5, "duplicate_id"),  # line 5's id clashes with line 4's
    ]
    again = cli(*args, "--resume")
    assert again.exit_code == 4, again.stderr  # the finished file still holds error records
    assert _records(out.read_text()) == recs


def test_resume_of_a_finished_file_with_error_records_exits_4(cli, tmp_path):
    f = _write(tmp_path / "p.txt", ["one", "", "three"])
    out = tmp_path / "out.jsonl"
    args = ("generate", "-f", str(f), "-o", str(out), "--max-new-tokens", "2", "--seed", "1", *TINY)
    assert cli(*args).exit_code == 4
    before = out.read_text()
    r = cli(*args, "--resume")
    assert r.exit_code == 4 and "1 of 3 records" in r.stderr, r.stderr
    assert out.read_text() == before


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_prompt(cli, tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_bytes("\ufeffhello\nworld\n".encode())
    recs = cli.jsonl("generate", "-f", str(lines), "--max-new-tokens", "2", *TINY)
    assert [r["prompt"] for r in recs] == ["hello", "world"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes('\ufeff{"prompt": "hi"}\n'.encode())
    recs = cli.jsonl("generate", "-f", str(jsonl), "--max-new-tokens", "2", *TINY)
    assert [r.get("prompt") for r in recs] == ["hi"] and "error" not in recs[0]
