"""--backend ray on a local Ray instance (2 CPUs, loopback, no dashboard): records equal to the local
backend's, a worker killed mid-job, SIGTERM, SIGINT and SIGKILL mid-job (exit 130 with the resume
hint, no process of the job left, --resume completes the file), what the cluster cannot do as usage
errors within 30 s, time limits on workers and chunks, error records, and the message when Ray is not
installed."""

from __future__ import annotations

from aigc_cli.core.modelspec import ModelSpec

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_records import BAD

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
        elif i == 7:
            lines.extend(BAD.values())  # every kind of bad record (raw lines)
        else:
            lines.append({"id": f"r{i}", "prompt": f"Record {i} begins with", **({"max_new_tokens": 4 + i % 9} if i % 2 else {})})
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_bytes(text.encode() + b'{"prompt": "bad \xff byte"}\n')  # a line that is not UTF-8


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}, **extra}


def _aigc(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc_cli", *args], capture_output=True, text=True, env=env or _env(), timeout=timeout)


def _job_processes(tag: str, group: int | None = None) -> list[str]:
    """The live processes of a job run with AIGC_TEST_JOB=tag (the watchdog, Ray's head processes,
    its workers: they inherit the environment) or in process group `group` (Ray's agents too, whose
    environment Ray overwrites with their names)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, pgid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        if state != "Z" and (int(pgid) == group or f"AIGC_TEST_JOB={tag}".encode() in env):
            found.append(f"{entry.name}: {cmd[:100]}")
    return found


def _gone(tag: str, group: int | None = None, within: float = 15.0) -> list[str]:
    """The job's processes still alive after `within` seconds (none, as soon as there are none)."""
    deadline = time.monotonic() + within
    while (left := _job_processes(tag, group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_ray_records_equal_the_local_backend(tmp_path, no_stray_ray):
    src = tmp_path / "in.jsonl"
    _write_input(src, 40)
    common = ["generate", "-f", str(src), "--model", MODEL, "--seed", "4", "-n", "2", "--max-new-tokens", "12"]
    local = _aigc(*common, "-o", str(tmp_path / "local.jsonl"))
    far = _aigc(*common, "-o", str(tmp_path / "ray.jsonl"), "--backend", "ray", "--workers", "2")
    assert local.returncode == far.returncode == 4, far.stderr  # two error records
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    errors = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines() if '"error"' in x]
    assert sorted(e["error"]["code"] for e in errors) == sorted(["empty_prompt", "prompt_too_long", "invalid_utf8", *BAD])


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


BIG = ["--model", MODEL, "--seed", "8", "--max-new-tokens", "60", "--min-new-tokens", "60"]


@pytest.fixture(scope="module")
def big_job(tmp_path_factory):
    """600 prompts (enough to stop mid-job) and their records from an uninterrupted local run."""
    root = tmp_path_factory.mktemp("big")
    src, ref = root / "in.txt", root / "ref.jsonl"
    src.write_text("".join(f"Prompt number {i} goes here\n" for i in range(600)))
    assert _aigc("generate", "-f", str(src), *BIG, "-o", str(ref)).returncode == 0
    return src, ref.read_text()


def _mid_job(args: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    """`aigc generate ARGS` in a process group of its own (stderr in OUT.stderr), once it has written
    20 records to `out`."""
    log = out.with_suffix(".stderr")
    with open(log, "w") as stderr:  # a file: a process left holding a pipe would hang the test, not fail it
        driver = subprocess.Popen([sys.executable, "-m", "aigc_cli", "generate", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                  start_new_session=True)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 20) and time.monotonic() < deadline:
        assert driver.poll() is None, f"the job ended before it could be interrupted: {log.read_text()}"
        time.sleep(0.05)
    return driver


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_mid_job_leaves_no_process_and_resume_gives_the_uninterrupted_records(sig, big_job, tmp_path, no_stray_ray):
    src, expected = big_job
    out = tmp_path / "out.jsonl"
    tag = uuid.uuid4().hex
    driver = _mid_job(["-f", str(src), *BIG, "-o", str(out), "--backend", "ray"], out, _env(AIGC_TEST_JOB=tag))
    assert len(_job_processes(tag, driver.pid)) >= 6  # the watchdog, gcs_server, raylet, agents, workers...: seen
    driver.send_signal(sig)
    code = driver.wait(timeout=60)
    stopped = time.monotonic()
    left = _gone(tag, driver.pid)
    assert not left, f"{len(left)} processes of the job outlived the driver: {left}"
    print(f"{sig.name}: exit {code}, no process of the job left {time.monotonic() - stopped:.1f} s after the driver's exit")
    text = out.with_suffix(".stderr").read_text()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130, text
        errors = [line for line in text.splitlines() if line.startswith("aigc:")]
        assert len(errors) == 1 and f"rerun the same command with --resume to continue from {out}" in errors[0], text
        assert "Traceback" not in text and "***" not in text and "received at" not in text, text  # no stack dump
    partial = out.read_text().count("\n")
    assert 20 <= partial < 600
    resumed = _aigc("generate", "-f", str(src), *BIG, "-o", str(out), "--backend", "ray", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text() == expected


def test_killed_on_a_cluster_it_joined_the_driver_leaves_no_worker_there(big_job, tmp_path, no_stray_ray):
    """--ray-address: aigc's actors and placement group belong to the driver's job, which Ray ends
    with the driver, SIGKILL included."""
    from aigc_cli.frontends.ray_backend import _holding

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head_dir = tempfile.mkdtemp(prefix="aigc-head-", dir="/tmp")  # short: Ray's socket paths live under it
    env = _env(RAY_AUTH_MODE="disabled")
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", head_dir],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )

    def workers() -> list[int]:
        return [pid for pid in _holding(head_dir) if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_Worker")]

    try:
        deadline = time.monotonic() + 60
        while not any(b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _holding(head_dir)):  # the head is up
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        out, tag = tmp_path / "out.jsonl", uuid.uuid4().hex
        args = ["-f", str(big_job[0]), *BIG, "-o", str(out), "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"]
        driver = _mid_job(args, out, {**env, "AIGC_TEST_JOB": tag})
        assert len(workers()) == 2
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 15
        while workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not workers(), "aigc's workers outlived the driver on the cluster it joined"
        assert not _gone(tag, driver.pid)  # and nothing ran here
    finally:
        head.terminate()  # ray start --block stops the cluster's processes
        head.wait(timeout=60)
        for pid in _holding(head_dir):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(head_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--ray-address", "127.0.0.1:1"], "--ray-address"),  # nothing listens
        (["--workers", str((os.cpu_count() or 2) + 1), "--worker-cpus", "1"], "--workers/--worker-cpus"),  # more than the CPUs
        (["--worker-gpus", "1"], "--worker-gpus"),  # no GPU (CUDA_VISIBLE_DEVICES is empty)
    ],
    ids=["address", "cpus", "gpus"],
)
def test_what_the_cluster_cannot_do_is_a_usage_error_within_30_s(flags, named, tmp_path, no_stray_ray):
    src = tmp_path / "in.txt"
    src.write_text("Hello\n")
    tag = uuid.uuid4().hex
    started = time.monotonic()
    r = _aigc("generate", "-f", str(src), "--model", MODEL, "-o", str(tmp_path / "out.jsonl"), "--backend", "ray", *flags,
              env=_env(AIGC_TEST_JOB=tag, CUDA_VISIBLE_DEVICES=""), timeout=60)
    took = time.monotonic() - started
    errors = [line for line in r.stderr.splitlines() if line.startswith("aigc:")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and errors[0].startswith(f"aigc: error: {named}: "), r.stderr
    assert "Traceback" not in r.stderr
    assert took < 30
    print(f"{errors[0]} ({took:.1f} s)")
    assert not _gone(tag)


class _Fake:
    """Just what `_place` asks of Ray: nodes, a placement group that is never ready, what is free."""

    def __init__(self, *nodes: dict[str, float]) -> None:
        self.nodes = lambda: [{"Alive": True, "Resources": r} for r in nodes]
        self.waited: list[float] = []
        self.util = SimpleNamespace(placement_group=lambda bundles, strategy: SimpleNamespace(ready=lambda: "ref"),
                                    remove_placement_group=lambda group: None)
        self.available_resources = lambda: {"CPU": 0.0}

    def wait(self, refs, timeout):
        self.waited.append(timeout)
        return [], refs


def test_the_resources_the_nodes_lack_name_their_flag_at_once_unless_an_autoscaler_can_add_them(monkeypatch):
    from aigc_cli.core.errors import UsageError
    from aigc_cli.frontends import ray_backend as rb

    two = {"CPU": 2.0, "memory": 1e9}
    with pytest.raises(UsageError, match=r"^--workers/--worker-cpus: 3 workers of 1.5 CPUs each do not fit here \(4 CPUs and 0 GPUs on 2 nodes: room for 2\)"):
        rb._place(_Fake(two, {"CPU": 2.0}), 3, rb._need(1.5, 0), "here")  # 3 CPUs in all, but 1.5 fits once a node
    with pytest.raises(UsageError, match=r"^--worker-gpus: 2 workers of 1 CPU and 0.5 GPUs each do not fit here"):
        rb._place(_Fake({"CPU": 8.0, "GPU": 0.5}), 2, rb._need(1, 0.5), "here")
    with pytest.raises(UsageError, match=r"^--workers/--worker-cpus/--worker-gpus: 1 worker of 2 CPUs and 1 GPU each do not fit here \(3 CPUs and 1 GPU on"):
        rb._place(_Fake({"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}), 1, rb._need(2, 1), "here")  # CPUs on one node, the GPU on the other
    ray = _Fake(two)
    with pytest.raises(UsageError, match="has room for them but only 0 CPUs free"):
        rb._place(ray, 2, rb._need(1, 0), "here")
    assert ray.waited == [rb.PLACE_TIMEOUT_S]
    group = SimpleNamespace(resources={"CPU": 4, "GPU": 0}, max_count=2)  # an autoscaler that can add 4-CPU nodes
    monkeypatch.setattr(rb, "_cluster_config", lambda: SimpleNamespace(node_group_configs=[group]))
    ray = _Fake(two)
    with pytest.raises(UsageError, match="did not grow to hold them after 600 s"):
        rb._place(ray, 5, rb._need(1, 0), "here")
    assert ray.waited == [rb.GROW_TIMEOUT_S]
    with pytest.raises(UsageError, match="room for 2"):
        rb._place(_Fake(two), 9, rb._need(1, 0), "here")  # more than it can grow to: at once


def test_workers_that_do_not_come_up_and_chunks_that_do_not_come_back_have_a_time_limit(tiny_lm, monkeypatch, no_stray_ray):
    from aigc_cli.core.errors import AigcError
    from aigc_cli.core.settings import GenerationSettings
    from aigc_cli.engine.engine import Engine, Request
    from aigc_cli.frontends import ray_backend as rb

    settings = GenerationSettings(max_new_tokens=8, seed=2).resolved()
    engine = Engine(tiny_lm)
    requests = [Request(i, f"Prompt {i} says", settings, 2, prompt_ids=tuple(engine.encode(f"Prompt {i} says", settings))) for i in range(8)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        monkeypatch.setattr(rb, "START_TIMEOUT_S", 0.0)
        with pytest.raises(AigcError, match=r"^--backend ray: 2 of 2 workers did not come up within 0 s \(loading tiny-random\)"):
            rb.RayEngine(ModelSpec.parse(MODEL, "cpu"), None, 2, 1.0, 0.0)
        monkeypatch.setattr(rb, "START_TIMEOUT_S", 120.0)
        remote = rb.RayEngine(ModelSpec.parse(MODEL, "cpu"), None, 2, 1.0, 0.0)  # the first pair's CPUs are free again
        monkeypatch.setattr(rb, "TASK_TIMEOUT_S", 2.0)
        monkeypatch.setattr(rb, "STEP_TIMEOUT_S", 0.25)
        for pid in remote.worker_pids:
            os.kill(pid, signal.SIGSTOP)  # a task that never returns
        try:
            started = time.monotonic()
            with pytest.raises(AigcError, match=r"^--backend ray: worker 0 did not return its 8 requests within 4 s$"):
                list(remote.stream(requests, lambda r: r))
            assert time.monotonic() - started < 10
        finally:
            for pid in remote.worker_pids:
                os.kill(pid, signal.SIGCONT)
        remote.close()
    finally:
        ray.shutdown()


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


def test_a_negative_worker_gpus_is_named(cli):
    r = cli("generate", "Hi", "--backend", "ray", "--worker-gpus", "-1", "--model", MODEL)
    assert r.exit_code == 2 and "--worker-gpus not negative (got 2, 1, -1)" in r.stderr


def test_ray_records_on_a_chinese_model_equal_the_local_backend(tmp_path, no_stray_ray):
    """tiny-random-zh (BERT vocabulary): the driver puts [CLS] before every prompt, as the local
    engine does, so the records are the same, texts written without spaces between characters."""
    src = tmp_path / "in.jsonl"
    prompts = ["在寂静的夜晚", "春风吹绿江南岸", "明月, 清风", "hello 山水", "", "月" * 600]
    src.write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in enumerate(prompts)))
    common = ["generate", "-f", str(src), "--model", "tiny-random-zh", "--seed", "2", "-n", "2", "--max-new-tokens", "10"]
    local = _aigc(*common, "-o", str(tmp_path / "local.jsonl"))
    far = _aigc(*common, "-o", str(tmp_path / "ray.jsonl"), "--backend", "ray", "--workers", "1")
    assert local.returncode == far.returncode == 4, far.stderr
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    texts = [json.loads(x)["text"] for x in (tmp_path / "ray.jsonl").read_text().splitlines() if '"text"' in x]
    assert texts and not any(re.search("[\u4e00-\u9fff] [\u4e00-\u9fff]", t) for t in texts)  # no space between characters
    assert not any(special in t for t in texts for special in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
