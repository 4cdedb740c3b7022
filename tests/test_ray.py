"""--backend ray on a local Ray instance (2 CPUs, loopback, no dashboard): records equal to the local
backend's, a worker killed mid-job, --resume after the driver is killed with SIGKILL, error records,
and the message when Ray is not installed."""

from __future__ import annotations

from aigc_cli.core.modelspec import ModelSpec

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

MODEL = "tiny-random"


def _ray_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::" in cmd or b"raylet" in cmd or b"gcs_server" in cmd or b"ray/_private" in cmd or b"ray/dashboard" in cmd:
                pids.add(int(entry.name))
    return pids


@pytest.fixture
def no_stray_ray():
    """Whatever Ray processes a test leaves behind (a driver killed with SIGKILL cannot clean up) are stopped."""
    before = _ray_pids()
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stray = _ray_pids() - before
        if not stray:
            return
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def _write_input(path: Path, n: int) -> None:
    lines = []
    for i in range(n):
        if i == 3:
            lines.append({"id": "empty", "prompt": ""})  # an error record
        elif i == 5:
            lines.append({"id": "long", "prompt": "word " * 2000})  # too long for the context
        else:
            lines.append({"id": f"r{i}", "prompt": f"Record {i} begins with", **({"max_new_tokens": 4 + i % 9} if i % 2 else {})})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _aigc(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return subprocess.run([sys.executable, "-m", "aigc_cli", *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_ray_records_equal_the_local_backend(tmp_path, no_stray_ray):
    src = tmp_path / "in.jsonl"
    _write_input(src, 40)
    common = ["generate", "-f", str(src), "--model", MODEL, "--seed", "4", "-n", "2", "--max-new-tokens", "12"]
    local = _aigc(*common, "-o", str(tmp_path / "local.jsonl"))
    far = _aigc(*common, "-o", str(tmp_path / "ray.jsonl"), "--backend", "ray", "--workers", "2")
    assert local.returncode == far.returncode == 4, far.stderr  # two error records
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    errors = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines() if '"error"' in x]
    assert sorted(e["error"]["code"] for e in errors) == ["empty_prompt", "prompt_too_long"]


def test_a_worker_killed_mid_job_is_restarted_and_the_records_are_identical(tiny_lm, no_stray_ray):
    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.frontends.ray_backend import RayEngine
    from aigc_cli.core.settings import GenerationSettings

    settings = GenerationSettings(num_sequences=2, max_new_tokens=24, top_p=0.9, seed=2).resolved()
    engine = Engine(tiny_lm)
    requests = [Request(i, f"Prompt {i} says", settings, 2, prompt_ids=tuple(engine.encode(f"Prompt {i} says", settings))) for i in range(60)]
    expected = [[c.text for c in cs] for _, cs in engine.stream(requests, lambda r: r)]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = RayEngine(ModelSpec.parse(MODEL, "cpu"), None, 2, 1.0, 0.0)
        victim = remote.worker_pids[0]

        def feed():
            for i, req in enumerate(requests):
                if i == 40:  # chunks are in flight on both workers
                    os.kill(victim, signal.SIGKILL)
                yield req

        got = [[c.text for c in cs] for _, cs in remote.stream(feed(), lambda r: r)]
        pids = {i["pid"] for i in ray.get([a.info.remote() for a in remote.actors])}
        remote.close()
    finally:
        ray.shutdown()
    assert victim not in pids  # the killed worker was replaced
    assert got == expected


def test_resume_after_the_driver_is_killed_gives_the_uninterrupted_records(tmp_path, no_stray_ray):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"Prompt number {i} goes here\n" for i in range(1500)))
    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    common = ["generate", "-f", str(src), "--model", MODEL, "--seed", "8", "--max-new-tokens", "60", "--min-new-tokens", "60"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "aigc_cli", *common, "-o", str(out), "--backend", "ray"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 20) and time.monotonic() < deadline:
        assert driver.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    partial = out.read_text().count("\n")
    assert 20 <= partial < 1500
    resumed = _aigc(*common, "-o", str(out), "--backend", "ray", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _aigc(*common, "-o", str(ref)).returncode == 0
    assert out.read_text() == ref.read_text()


def test_without_ray_the_message_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    src = tmp_path / "in.txt"
    src.write_text("Hello\n")
    r = cli("generate", "-f", str(src), "--backend", "ray", "--model", MODEL, "-o", str(tmp_path / "out.jsonl"))
    assert r.exit_code == 2
    assert 'pip install "aigc[ray]"' in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists()  # refused before anything was opened


def test_ray_flags_need_the_ray_backend(cli):
    r = cli("generate", "Hi", "--workers", "3", "--model", MODEL)
    assert r.exit_code == 2 and "--backend ray" in r.stderr
