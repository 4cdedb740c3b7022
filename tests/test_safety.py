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
    from aigc_cli.jobs import outfile

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


# --- resource exhaustion ---------------------------------------------------------------------


def _model_variant(tiny_dir: Path, tmp_path: Path, edit) -> Path:
    import shutil

    target = tmp_path / "variant"
    shutil.copytree(tiny_dir, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: (c.clear(), c.update(model_type="llama")), "do not match config.json"),  # a 6.9B default Llama
        (lambda c: c.update(n_embd=c["n_embd"] * 2), "have other shapes"),
        (lambda c: c.update(n_layer=c["n_layer"] + 1), "are missing"),
    ],
    ids=["llama", "wider", "deeper"],
)
def test_a_config_that_lies_is_refused_before_anything_is_built(cli, tiny_dir, tmp_path, edit, message):
    model = _model_variant(tiny_dir, tmp_path, edit)
    r = cli("generate", "hi", "--model", str(model), "--max-new-tokens", "2")
    assert r.exit_code == 3, r.stderr
    assert message in r.stderr and "model.safetensors" in r.stderr, r.stderr


def test_a_broken_config_is_named_as_such(cli, tiny_dir, tmp_path):
    model = _model_variant(tiny_dir, tmp_path, lambda c: None)
    (model / "config.json").write_text('{"model_type": gpt2')
    r = cli("generate", "hi", "--model", str(model))
    assert r.exit_code == 3 and "config.json" in r.stderr and "tokenizer" not in r.stderr, r.stderr


@pytest.mark.parametrize("text", ['{"eos_token": ', "[1, 2]", "[" * 100_000])
def test_a_broken_tokenizer_config_is_named_as_such(cli, tiny_dir, tmp_path, text):
    model = _model_variant(tiny_dir, tmp_path, lambda c: None)
    (model / "tokenizer_config.json").write_text(text)
    r = cli("generate", "hi", "--model", str(model), "--max-new-tokens", "2")
    assert r.exit_code == 3 and "tokenizer_config.json" in r.stderr and "Error" not in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["native", "transformers"])
def test_weights_larger_than_memory_are_refused(cli, tiny_dir, tmp_path, monkeypatch, kind):
    from aigc_cli.models import checkpoint

    edit = (lambda c: None) if kind == "native" else (lambda c: c.update(scale_attn_by_inverse_layer_idx=True))
    model = _model_variant(tiny_dir, tmp_path, edit)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1 << 20)
    r = cli("generate", "hi", "--model", str(model), "--max-new-tokens", "2")
    assert r.exit_code == 3 and "memory available" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-p", "nan"], "--top-p"),
        (["--repetition-penalty", "inf"], "--repetition-penalty"),
        (["--decoding", "beam", "--length-penalty", "nan"], "--length-penalty"),
        (["--decoding", "beam", "--num-beams", "5000"], "--num-beams"),
        (["--decoding", "contrastive", "--top-k", "100000"], "--top-k"),
        (["--penalty-alpha", "nan"], "--penalty-alpha"),
        (["-n", "100000"], "-n/--num-sequences"),
        (["--batch-size", "1000000"], "--batch-size"),
    ],
)
def test_numeric_flags_are_bounded_and_finite(cli, args, flag):
    r = cli("generate", "hi", *TINY, *args)
    assert r.exit_code == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_jsonl_overrides_are_bounded_and_finite(cli, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "temperature": NaN}\n{"prompt": "b", "top_p": Infinity}\n{"prompt": "c", "n": 99999999}\n')
    r = cli("generate", "-f", str(f), "--max-new-tokens", "2", *TINY)
    assert r.exit_code == 4
    errors = [x["error"]["message"] for x in _records(r.stdout)]
    assert "'temperature'" in errors[0] and "'top_p'" in errors[1] and "'n'" in errors[2], errors


def test_beams_that_memory_cannot_hold_are_refused(cli, monkeypatch):
    from aigc_cli.models import checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1 << 16)
    r = cli("generate", "hi", *TINY, "--decoding", "beam", "--num-beams", "8")
    assert r.exit_code == 2 and "--num-beams 8" in r.stderr and "memory available" in r.stderr, r.stderr


def test_score_holds_a_bounded_slice_of_the_logits(tiny_lm, monkeypatch):
    """The LM head runs on a bounded number of positions at a time, whatever the text's length."""
    from aigc_cli.engine import scoring

    sizes = []
    real = tiny_lm.model.logits

    def spy(hidden):
        sizes.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return real(hidden)

    monkeypatch.setattr(tiny_lm.model, "logits", spy)
    ids = [5 + i % 1000 for i in range(4000)]
    result = scoring.perplexity(tiny_lm.model, ids, 0, tiny_lm.context_length, batch_size=8)
    assert result.tokens == len(ids)
    assert max(sizes) <= scoring._HEAD_ROWS


def test_long_texts_are_tokenized_in_pieces_with_the_same_ids(tiny_lm, monkeypatch):
    from aigc_cli.engine import scoring

    text = "".join(f"line {i} of the text,  with  spaces\n\n  indented {i}\n" for i in range(400))
    monkeypatch.setattr(scoring, "_PIECE", 500)
    calls = []
    real = tiny_lm.tokenizer.encode
    monkeypatch.setattr(tiny_lm.tokenizer, "encode", lambda t, **kw: calls.append(len(t)) or real(t, **kw))
    ids = scoring.encode_long(tiny_lm.tokenizer, text).tolist()
    assert len(calls) > 10 and max(calls) < 700
    assert ids == real(text, add_special_tokens=False)


# --- terminal injection ----------------------------------------------------------------------


def test_control_characters_are_escaped_for_a_screen_and_kept_in_data(cli):
    prompt = "\x1b[2J\x1b]0;owned\x07 hello\r"
    rich = cli("generate", prompt, *TINY, "--max-new-tokens", "2", "--format", "rich")
    assert rich.exit_code == 0
    assert "\x1b[2J" not in rich.stdout and "\x07" not in rich.stdout and "\r" not in rich.stdout
    assert "^[[2J^[]0;owned^G hello^M" in rich.stdout
    plain = cli("generate", prompt, *TINY, "--max-new-tokens", "2", "--format", "plain")
    assert prompt in plain.stdout  # plain text to a pipe is the data itself (documented)
    recs = cli.jsonl("generate", prompt, *TINY, "--max-new-tokens", "2")
    assert recs[0]["prompt"] == prompt


def test_visible_shows_every_control_character_and_keeps_text():
    from aigc_cli.frontends.cli.render import visible

    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("\x1b\x00\x7f\x9b") == "^[^@^?M-^["
    assert visible("naïve 诗 🙂") == "naïve 诗 🙂"


def test_error_messages_on_a_terminal_are_escaped(monkeypatch):
    import io

    from aigc_cli.frontends.cli.render import Messages, Streams

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    Messages(Streams(stdout=io.StringIO(), stderr=err)).error("line 3: \x1b[2J bad")
    assert "\x1b[2J" not in err.getvalue() and "^[[2J" in err.getvalue()


# --- usability -------------------------------------------------------------------------------


def test_stop_takes_backslash_escapes_as_the_help_shows(cli):
    from aigc_cli.core.textrules import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape(r"\u00e9\x41") == "éA"
    assert unescape(r"\d") == r"\d"
    recs = cli.jsonl("generate", "hi", *TINY, "--max-new-tokens", "2", "--stop", r"\n")
    assert recs[0]["settings"]["stop"] == ["\n"]


def test_version_alone_and_a_directory_as_input(cli, tmp_path):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("aigc ")
    r = cli("generate", "-f", str(tmp_path), *TINY)
    assert r.exit_code == 2 and "is a directory" in r.stderr


def test_help_names_values_as_a_user_writes_them(cli):
    out = cli("generate", "--help").stdout + cli("poem", "--help").stdout
    options = [line for line in out.splitlines() if line.lstrip().startswith("-")]
    assert not [line for line in options if "<list[str]>" in line or "<str>" in line]
    assert "N|auto" in out and "FILE" in out
    poem = cli("poem", "--help").stdout
    assert "<sample|beam>" in poem and "contrastive" not in poem


def test_poem_decoding_accepts_only_sample_and_beam(cli):
    r = cli("poem", "sea", *TINY, "--decoding", "greedy")
    assert r.exit_code == 2


# --- catalogs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('id,title\n0,Fine\n1,"Broken title\n2,Second\n3,Third\n', "line 3: malformed CSV"),
        ('id,title\n0,Fine\n1,"Broken title\n2,Second\n3,"Third"\n', "line 3: malformed CSV"),
        ("id,title\n0,Fine\n2,B,extra\n", "line 3: has 3 fields, the header 2"),
        ("id,title,category\n0,Fine,x\n2,B\n", "line 3: has 2 fields, the header 3"),
        ("id,title\n0,Fine\n0,B\n", "line 3: item id '0' was used by an earlier row"),
    ],
    ids=["unclosed-quote", "quote-closed-later", "extra-field", "missing-field", "duplicate-id"],
)
def test_malformed_catalog_rows_are_left_out_naming_the_row(cli, tmp_path, text, message):
    """A bad catalog row is a warning naming the file and line; the good rows are still
    recommended and the exit status (4) says something was left out."""
    f = tmp_path / "catalog.csv"
    f.write_text(text)
    r = cli("recommend", "news", "--catalog", str(f), *TINY)
    assert r.exit_code == 4, r.stderr
    assert f"--catalog {f} {message}" in r.stderr, r.stderr
    assert "Fine" in r.stdout and "Traceback" not in r.stderr


def test_a_well_formed_csv_with_quotes_and_blank_lines_loads(tmp_path):
    from aigc_cli.apps.recommend import load_catalog

    f = tmp_path / "catalog.csv"
    f.write_text('\ufeffid,title,description\n1,"A, with a comma",x\n\n2,"Say ""hi""",y\n')
    items = load_catalog(str(f))
    assert [(i.id, i.title) for i in items] == [("1", "A, with a comma"), ("2", 'Say "hi"')]


# --- inputs larger than memory -----------------------------------------------------------------


@pytest.mark.parametrize("first", ["jsonl", "too long"])
def test_a_line_too_long_to_hold_is_an_error_record_and_is_never_read_whole(cli, tmp_path, monkeypatch, first):
    from aigc_cli.jobs import records as batch

    monkeypatch.setattr(batch, "MAX_LINE_BYTES", 256)
    long = "x" * 5000  # read past in 1 MiB chunks; the limit is 64 MiB for real
    lines = [json.dumps({"prompt": "one"}), json.dumps({"prompt": long}), json.dumps({"prompt": "three"})]
    if first == "too long":  # JSONL is still recognised behind it
        lines = [json.dumps({"prompt": long}), *lines]
    f = _write(tmp_path / "p.jsonl", lines)
    r = cli("generate", "-f", str(f), "--max-new-tokens", "2", *TINY)
    assert r.exit_code == 4, r.stderr
    recs = _records(r.stdout)
    bad = [x for x in recs if "error" in x]
    assert [x["prompt"] for x in recs if "error" not in x] == ["one", "three"]
    assert [x["error"]["code"] for x in bad] == ["line_too_long"] * len(bad) and bad[-1]["line"] == len(lines) - 1
    assert "longer than" in bad[-1]["error"]["message"]


def test_a_prompt_longer_than_any_context_is_refused_before_it_is_tokenized(tiny_lm, monkeypatch):
    from aigc_cli.engine.engine import Engine
    from aigc_cli.core.errors import RecordError
    from aigc_cli.core.settings import GenerationSettings

    engine = Engine(tiny_lm)
    settings = GenerationSettings(max_new_tokens=2).resolved()
    longest = engine.longest_token
    assert longest == max(len(t) for t in tiny_lm.tokenizer.get_vocab())
    fits = "word " * 200  # far fewer characters than the bound: tokenized and accepted
    assert engine.encode(fits, settings)
    tokenized: list[int] = []
    real = tiny_lm.tokenizer.encode
    monkeypatch.setattr(tiny_lm.tokenizer, "encode", lambda text, **kw: tokenized.append(len(text)) or real(text, **kw))
    with pytest.raises(RecordError) as err:
        engine.encode("a" * (engine.context_length * longest + 1), settings)
    assert err.value.code == "prompt_too_long" and "characters" in str(err.value) and tokenized == []
    with pytest.raises(RecordError) as err:  # at the bound it is tokenized, and the count decides
        engine.encode("a " * (engine.context_length * longest // 2), settings)
    assert err.value.code == "prompt_too_long" and "tokens" in str(err.value) and tokenized
