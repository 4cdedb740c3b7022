"""No record stops a job: every kind of bad record becomes an error record in its place and the
others come out byte-identical to a clean run; the job ends with a count per error code and exit 4;
--resume counts error records as done unless --retry-errors runs them again (their new records
take the error lines' places). Every command reads files the same way (BOM, CRLF, bad lines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ("--model", "tiny-random")

GOOD = [{"id": "a", "prompt": "the sea at night"}, {"id": "b", "prompt": "Once upon a time", "n": 2}, {"id": "c", "prompt": "cold gold"}]
BAD = {
    "invalid_text": '{"prompt": "bad \\ud800 surrogate"}',
    "empty_prompt": '{"prompt": "   "}',
    "prompt_too_long": json.dumps({"prompt": "sea " * 1100}),
    "bad_override": '{"prompt": "x", "temperature": -1}',
    "malformed_json": '{"prompt": ',
    "missing_prompt": '{"text": "no prompt"}',
}


def _lines(records: list) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def _run(cli, tmp_path: Path, lines: list[str], *extra: str):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return cli("generate", "-f", str(src), "--max-new-tokens", "4", "--seed", "1", *TINY, "--format", "jsonl", *extra)


def test_every_kind_of_bad_record_fails_alone_with_its_code(cli, tmp_path):
    clean = _run(cli, tmp_path, _lines(GOOD))
    assert clean.exit_code == 0
    mixed = [json.dumps(GOOD[0]), *BAD.values(), json.dumps(GOOD[1]), '{"prompt": "NUL \\u0000 inside"}', json.dumps(GOOD[2])]
    r = _run(cli, tmp_path, mixed)
    assert r.exit_code == 4, r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    errors = [x for x in records if "error" in x]
    assert [x["error"]["code"] for x in errors] == list(BAD)
    good = [x for x in records if "error" not in x and x["prompt"] != "NUL \x00 inside"]
    assert [(g["prompt"], g["text"], g["index"]) for g in good] == [
        (g["prompt"], g["text"], g["index"]) for g in (json.loads(x) for x in clean.stdout.splitlines())
    ]  # byte-identical texts, whatever failed beside them
    for code in BAD:
        assert f"1 {code}" in r.stderr, r.stderr  # the count per code
    assert "Traceback" not in r.stderr


def test_invalid_utf8_lines_are_error_records_naming_the_line(cli, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"first prompt\nbad \xff byte\r\nlast prompt\n")
    r = cli("generate", "-f", str(src), "--max-new-tokens", "3", *TINY, "--format", "jsonl")
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 4 and [x.get("error", {}).get("code") for x in records] == [None, "invalid_utf8", None]
    assert records[1]["line"] == 2 and "line 2" in records[1]["error"]["message"]


def test_retry_errors_runs_them_again_and_puts_their_records_in_place(cli, tmp_path, monkeypatch):
    from aigc_cli.engine.scheduler import Scheduler

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_lines(GOOD)) + "\n")
    clean_out = tmp_path / "clean.jsonl"
    assert cli("generate", "-f", str(src), "-o", str(clean_out), "--max-new-tokens", "4", "--seed", "1", *TINY).exit_code == 0
    doomed = None

    def fault(spec) -> None:  # record 2 fails inside the engine, alone
        if spec.key[0] == 1 and doomed is not None:
            raise RuntimeError("transient fault")

    doomed = True
    monkeypatch.setattr(Scheduler, "fault", staticmethod(fault))
    out = tmp_path / "out.jsonl"
    args = ("generate", "-f", str(src), "-o", str(out), "--max-new-tokens", "4", "--seed", "1", *TINY)
    first = cli(*args)
    assert first.exit_code == 4 and "1 generation_failed" in first.stderr, first.stderr
    codes = [json.loads(x).get("error", {}).get("code") for x in out.read_text().splitlines()]
    assert codes == [None, "generation_failed", None]
    monkeypatch.undo()
    again = cli(*args, "--resume")  # an error record counts as done
    assert again.exit_code == 4 and out.read_text().count("generation_failed") == 1
    retried = cli(*args, "--resume", "--retry-errors")
    assert retried.exit_code == 0, retried.stderr
    assert out.read_bytes() == clean_out.read_bytes()  # the records in their place, as in a clean run


def test_compaction_after_an_interrupted_retry(tmp_path):
    """Killed after a retried record was appended but before it moved: the next retry moves it."""
    from aigc_cli.jobs.resume import compacted

    a = json.dumps({"id": 1, "index": 0, "text": "a"})
    err = json.dumps({"id": 2, "line": 2, "error": {"code": "generation_failed", "message": "x"}})
    c = json.dumps({"id": 3, "index": 0, "text": "c"})
    new = [json.dumps({"id": 2, "index": i, "text": f"b{i}"}) for i in (1, 0)]
    data = "\n".join([a, err, c, *new]).encode() + b"\n"
    assert compacted(data, {2: 2}) == "\n".join([a, new[1], new[0], c]).encode() + b"\n"


def test_score_reads_files_as_generate_does(cli, tmp_path):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"Hello world\nBye\n")
    crlf.write_bytes(b"\xef\xbb\xbfHello world\r\nBye\r\n")
    a, b = (cli("score", str(p), *TINY, "--format", "jsonl") for p in (lf, crlf))
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout  # the BOM is not text, CRLF is a line end
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nbad \xff line\n\nanother good line\n")
    r = cli("score", str(bad), "--per-line", *TINY, "--format", "jsonl")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 4 and [x["line"] for x in rows] == [1, 2, 4]
    assert "error" in rows[1] and "perplexity" in rows[0] and "perplexity" in rows[2]
    assert f"{bad} line 2: not valid UTF-8" in r.stderr


def test_recommend_leaves_out_what_cannot_be_used_and_says_so(cli, tmp_path):
    catalog = tmp_path / "news.tsv"
    catalog.write_text("id\ttitle\nN1\tSea news\nN2\tbroken\textra field\nN3\tSports today\n")
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN3-1 N1-0\n2\tU2\t11/11/2019 9:06:01 AM\t\tN3-1 N1-0\n")
    r = cli("recommend", "--catalog", str(catalog), "--eval", str(behaviors), *TINY, "--format", "jsonl")
    assert r.exit_code == 4, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows[0]["users"] == 1
    assert f"--catalog {catalog} line 3: has 3 fields, the header 2" in r.stderr
    assert f"--eval {behaviors} line 2: the user has no interests and no history" in r.stderr


def test_a_poem_checks_a_file_with_a_bom_and_crlf(cli, tmp_path):
    poem = tmp_path / "haiku.txt"
    poem.write_bytes(b"\xef\xbb\xbfan old silent pond\r\na frog jumps into the pond\r\nsplash! silence again\r\n")
    r = cli("poem", "--check", str(poem), "--form", "haiku", "--format", "jsonl")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["text"] == "an old silent pond"


def test_messages_name_the_flags_of_the_command_that_ran(cli):
    r = cli("poem", "sea " * 1200, *TINY)
    assert r.exit_code == 2 and "--max-new-tokens" not in r.stderr and "topic" in r.stderr
    r = cli("recommend", "sea " * 1200, "--per-interest", "1", *TINY)
    assert r.exit_code == 2 and "--max-new-tokens" not in r.stderr and "interest 1" in r.stderr


def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it():
    exe = [sys.executable, "-m", "aigc_cli"]
    done = subprocess.run([*exe, "generate", b"bad \xff prompt", *TINY], capture_output=True, timeout=120)
    assert done.returncode == 2 and b"prompt 1: not valid UTF-8" in done.stderr, done.stderr
    done = subprocess.run([*exe, "generate", "ok", "--stop", b"\xfe", *TINY], capture_output=True, timeout=120)
    assert done.returncode == 2 and b"--stop" in done.stderr, done.stderr


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"])
def test_an_empty_input_is_nothing_to_do(cli, tmp_path, content):
    src = tmp_path / "empty.txt"
    src.write_bytes(content)
    r = cli("generate", "-f", str(src), *TINY, "--format", "jsonl")
    assert r.exit_code == 0 and r.stdout == ""


def test_finetune_leaves_out_bad_documents_and_records_and_trains_on_the_rest(cli, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("The sea is calm tonight. The tide is full, the moon lies fair.\n" * 20)
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"GIF89a\x00\x01\x02")
    records = tmp_path / "more.jsonl"
    records.write_text('{"text": "upon the straits"}\n{"txt": "a typo"}\nnot json\n{"text": "the light gleams"}\n')
    out = tmp_path / "model"
    r = cli("finetune", str(good), str(binary), str(records), "-o", str(out), *TINY, "--steps", "2", "--block-size", "32", "--save-every", "0")
    assert r.exit_code == 4, r.stderr
    assert f"{binary}: binary data" in r.stderr and "left out" in r.stderr
    assert f"{records} line 2: not a JSON object" in r.stderr and f"{records} line 3" in r.stderr
    assert (out / "model.safetensors").is_file()
