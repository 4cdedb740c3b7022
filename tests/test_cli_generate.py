"""`aigc generate` and `aigc info` through the CLI: options, formats, errors and exit codes."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc_cli.core.errors import ModelUnavailableError
from aigc_cli.frontends.cli.render import OutputFormat, SequenceRenderer, Streams
from tests.conftest import ANSI

TINY = ("--model", "tiny-random")


def test_plain_numbered_sequences_and_clean_stderr(cli):
    r = cli("generate", "Hello, how are you?", "-n", "3", "--max-new-tokens", "10", *TINY)
    assert r.exit_code == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if line.startswith("---")] == [
        "--- Sequence 1 ---",
        "--- Sequence 2 ---",
        "--- Sequence 3 ---",
    ]
    assert r.stdout.count("Hello, how are you?") == 3
    assert not ANSI.search(r.stdout)
    assert r.stderr == ""  # no transformers warnings, no spinner in a pipe


def test_jsonl_fields(cli, tiny_lm):
    recs = cli.jsonl("generate", "Hello", "World!", "-n", "2", "--max-new-tokens", "7", "--seed", "5", *TINY)
    assert [(r["id"], r["index"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:
        assert set(r) >= {"id", "index", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens", "seed", "model"}
        assert r["model"] == "tiny-random" and r["seed"] == 5
        assert r["finish_reason"] in {"length", "eos"}
        assert r["prompt_tokens"] == len(tiny_lm.tokenizer.encode(r["prompt"]))
        assert r["completion_tokens"] <= 7
        assert not r["text"].startswith(r["prompt"])
        assert r["settings"]["max_new_tokens"] == 7


def test_text_is_exactly_the_decoded_continuation(cli, tiny_lm):
    (rec,) = cli.jsonl("generate", "Hi", "--decoding", "greedy", "--max-new-tokens", "12", *TINY)
    import torch

    ids = tiny_lm.tokenizer.encode("Hi")
    out = tiny_lm.hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=256)
    gen = [t for t in out[0, len(ids) :].tolist() if t != 256]
    assert rec["text"] == tiny_lm.tokenizer.decode(gen, clean_up_tokenization_spaces=False)


def test_same_seed_same_output_different_seed_differs(cli):
    args = ("generate", "Hello", "-n", "3", "--max-new-tokens", "15", *TINY)
    a = cli(*args, "--seed", "1").stdout
    assert a == cli(*args, "--seed", "1").stdout
    assert a != cli(*args, "--seed", "2").stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--decoding", "greedy"],
        ["--temperature", "0"],
        ["--decoding", "beam", "--num-beams", "3", "-n", "2", "--length-penalty", "0.8", "--early-stopping"],
        ["--decoding", "contrastive", "--penalty-alpha", "0.5", "--top-k", "3"],
        ["--top-k", "5", "--top-p", "0.9", "--typical-p", "0.9", "--min-p", "0.05", "--temperature", "0.7"],
        ["--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--min-new-tokens", "5"],
        ["--stop", "a", "--stop", "e", "--ban", "the"],
        ["--device", "cpu", "--dtype", "float32"],
        ["--dtype", "bfloat16"],
    ],
)
def test_every_option_runs(cli, extra):
    r = cli("generate", "Hello there", "--max-new-tokens", "8", *TINY, *extra)
    assert r.exit_code == 0, r.stderr
    assert "Sequence 1" in r.stdout
    recs = cli.jsonl("generate", "Hello there", "--max-new-tokens", "8", *TINY, *extra)
    settings = recs[0]["settings"]
    flags = dict(zip(extra, [*extra[1:], None]))
    assert len(recs) == int(flags.get("-n", 1))
    assert settings["decoding"] == ("greedy" if flags.get("--temperature") == "0" else flags.get("--decoding", "sample"))
    for flag, value in flags.items():  # every flag reached the settings
        key = flag.lstrip("-").replace("-", "_")
        if key in settings and key not in ("stop", "ban", "decoding") and value is not None and not value.startswith("--"):
            assert float(settings[key]) == float(value), flag
    for rec in recs:
        if "--stop" in flags:
            assert settings["stop"] == ["a", "e"] and not {"a", "e"} & set(rec["text"]), rec
            assert re.search(r"\bthe\b", rec["text"], re.I) is None
        if "--min-new-tokens" in flags:
            assert rec["completion_tokens"] >= 5 or rec["finish_reason"] == "stop"
        assert rec["completion_tokens"] <= 8
    if flags.get("--dtype") == "bfloat16":
        assert recs[0]["revision"].endswith("+bfloat16")


def test_rich_format_is_literal_and_styled(cli):
    prompt = "[bold red]not markup[/bold red] :smile:"
    r = cli("generate", prompt, "--format", "rich", "--max-new-tokens", "5", *TINY)
    assert r.exit_code == 0, r.stderr
    assert ANSI.search(r.stdout)
    plain = ANSI.sub("", r.stdout)
    assert "Sequence 1" in plain and prompt in plain


def test_no_color_means_no_colour_codes(cli):
    r = cli("generate", "Hello", "--format", "rich", "--max-new-tokens", "5", *TINY, env={"NO_COLOR": "1"})
    assert r.exit_code == 0
    assert not any(code.startswith("\x1b[3") or ";3" in code for code in ANSI.findall(r.stdout))


def test_model_from_env_and_local_dir(cli, tiny_dir):
    args = ("generate", "Hello", "--decoding", "greedy", "--max-new-tokens", "12", "--format", "jsonl")
    builtin = cli(*args, *TINY)
    from_env = cli(*args, env={"AIGC_MODEL": "tiny-random"})
    local = cli(*args, "--model", str(tiny_dir))
    assert local.exit_code == 0, local.stderr
    assert local.stderr == ""
    text = lambda r: [line.split('"text": ')[1].split(", \"finish")[0] for line in r.stdout.splitlines()]  # noqa: E731
    assert text(builtin) == text(from_env) == text(local)


# --- bad input: one line on stderr, the documented exit code, no traceback -------------------

BAD = [
    (["generate", ""], 2, "prompt 1 is empty"),
    (["generate", "hi", "--top-p", "1.5"], 2, "--top-p"),
    (["generate", "hi", "--top-p", "0"], 2, "--top-p"),
    (["generate", "hi", "--temperature", "-1"], 2, "--temperature"),
    (["generate", "hi", "--decoding", "beam", "--num-beams", "2", "-n", "3"], 2, "--num-beams (2)"),
    (["generate", "hi", "--decoding", "greedy", "-n", "2"], 2, "-n/--num-sequences"),
    (["generate", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["generate", "hi", "--device", "tpu"], 2, "--device"),
    (["generate", "hi", "--dtype", "int4"], 2, "--dtype"),
    (["generate", "hi", "--model", "./no/such/dir"], 3, "no such directory"),
]


@pytest.mark.parametrize("args, code, message", BAD, ids=[" ".join(a[1:]) or "none" for a, _, _ in BAD])
def test_bad_input(cli, args, code, message):
    r = cli(*args, *(TINY if "--model" not in args else ()))
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_no_prompt_on_a_terminal_is_a_usage_error(cli, monkeypatch):
    monkeypatch.setattr("aigc_cli.jobs.sources.stdin_is_terminal", lambda: True)
    r = cli("generate", *TINY)
    assert r.exit_code == 2 and "no prompt given" in r.stderr


def test_prompt_too_long_gives_both_counts(cli):
    r = cli("generate", "abcdefghij", "--max-new-tokens", "1020", *TINY)
    assert r.exit_code == 2
    assert "10 tokens" in r.stderr and "1020" in r.stderr and "1024" in r.stderr


def test_validation_happens_before_the_model_loads(cli):
    started = time.perf_counter()
    r = cli("generate", "hi", "--top-p", "7", "--model", "gpt2")
    assert r.exit_code == 2 and time.perf_counter() - started < 2


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_unknown_model_fails_fast_naming_model_path(cli, env):
    started = time.perf_counter()
    r = cli("generate", "hi", "--model", "no-such-org/no-such-model", env=env)
    assert r.exit_code == 3, r.stderr
    assert "--model PATH" in r.stderr and "no-such-org/no-such-model" in r.stderr
    assert time.perf_counter() - started < 10


def _corrupt_copy(tiny_dir: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / how
    shutil.copytree(tiny_dir, target)
    weights = target / "model.safetensors"
    if how == "lfs":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123456\n")
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        weights.unlink()
    elif how == "no-config":
        (target / "config.json").unlink()
    return target


@pytest.mark.parametrize(
    "how, message",
    [("lfs", "git-lfs pointer"), ("truncated", "truncated"), ("missing", "no weights file"), ("no-config", "config.json")],
)
def test_broken_model_dir_names_the_file(cli, tiny_dir, tmp_path, how, message):
    path = _corrupt_copy(tiny_dir, tmp_path, how)
    r = cli("generate", "hi", "--model", str(path))
    assert r.exit_code == 3
    assert message in r.stderr
    if how in ("lfs", "truncated"):
        assert "model.safetensors" in r.stderr


def test_debug_shows_the_exception(cli):
    r = cli("generate", "hi", "--model", "./no/such/dir", "--debug")
    assert isinstance(r.exception, ModelUnavailableError)
    r = cli("generate", "hi", "--model", "./no/such/dir", env={"AIGC_DEBUG": "1"})
    assert isinstance(r.exception, ModelUnavailableError)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_gpu(cli):
    r = cli("generate", "hi", "--device", "cuda", *TINY)
    assert r.exit_code == 2 and "--device cuda" in r.stderr


def test_help_documents_exit_codes_and_tiny_model(cli):
    r = cli("generate", "--help")
    assert r.exit_code == 0
    flat = " ".join(r.stdout.split())
    assert "Exit codes" in flat and "130" in flat and "gibberish" in flat
    for flag in ("--decoding", "--penalty-alpha", "--ban", "--stop", "--format", "--min-p", "--typical-p"):
        assert flag in r.stdout


def test_info(cli, tiny_dir):
    r = cli("info", *TINY)
    assert r.exit_code == 0
    assert "torch" in r.stdout and "transformers" in r.stdout and "built-in" in r.stdout
    r = cli("info", "--model", str(tiny_dir))
    assert f"local directory {tiny_dir}" in r.stdout
    r = cli("info", "--model", "gpt2", env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 3 and "--model PATH" in r.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_streaming_shows_text_as_it_grows_and_holds_back_stops():
    out = _Tty()
    renderer = SequenceRenderer(Streams(stdout=out, stderr=io.StringIO()), OutputFormat.plain, False)
    assert renderer.can_stream

    class C:
        id, index, prompt = 0, 0, "P:"

    renderer.stream(C, "ab", ("XY",))
    assert out.getvalue().endswith("P:ab")
    renderer.stream(C, "abcX", ("XY",))
    assert out.getvalue().endswith("P:abc")  # "X" might start the stop string
    C.text = "abcX1"
    renderer.completion(C)
    assert out.getvalue() == "--- Sequence 1 ---\nP:abcX1\n\n"


def _entry_point() -> list[str]:
    exe = Path(sys.executable).with_name("aigc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aigc_cli"]


@pytest.mark.parametrize("command", [_entry_point(), [sys.executable, "-m", "aigc_cli"]], ids=["aigc", "python-m"])
def test_installed_entry_point(command):
    env = {k: v for k, v in os.environ.items() if k not in ("AIGC_MODEL", "NO_COLOR")}
    done = subprocess.run(
        [*command, "generate", "Hello", "-n", "2", "--max-new-tokens", "5", "--model", "tiny-random", "--format", "jsonl"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and done.stderr == ""
    bad = subprocess.run([*command, "generate", "hi", "--top-p", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--top-p" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("files, wanted, unwanted", [
    (["config.json", "model.safetensors", "pytorch_model.bin"], "*.safetensors", "pytorch_model*.bin"),
    (["config.json", "pytorch_model.bin", "vocab.txt"], "pytorch_model*.bin", "*.safetensors"),
])
def test_hub_download_flow_with_a_fake_hub(cli, tiny_dir, monkeypatch, files, wanted, unwanted):
    """No machine here reaches the Hub: a fake client checks what is fetched and that it loads."""
    import huggingface_hub

    asked = {}

    def fake_snapshot(repo_id, allow_patterns):
        asked["repo"], asked["patterns"] = repo_id, allow_patterns
        return str(tiny_dir)

    monkeypatch.setattr("aigc_cli.models.loading._hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    r = cli("generate", "hi", "--model", "some-org/some-gpt2", "--decoding", "greedy", "--max-new-tokens", "3")
    assert r.exit_code == 0, r.stderr
    assert asked["repo"] == "some-org/some-gpt2"
    assert wanted in asked["patterns"] and unwanted not in asked["patterns"]
    # provenance of a Hub model is its snapshot (the commit, in a real cache)
    rec = cli.jsonl("generate", "hi", "--model", "some-org/some-gpt2", "--decoding", "greedy", "--max-new-tokens", "3")
    assert rec[0]["revision"] == tiny_dir.name
