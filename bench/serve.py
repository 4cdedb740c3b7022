"""Server benchmark: 1, 8 and 32 concurrent clients streaming 64-token completions from `aigc serve`,
and the same load against `transformers serve` (with and without its continuous batching); beside
them, `aigc generate -f` offline on the same prompts, and the README example through the CLI client.
Writes bench/RESULTS-serve.md.

    .venv/bin/python bench/serve.py                       # everything (about 15 minutes on 2 cores)
    .venv/bin/python bench/serve.py --skip-transformers   # aigc only
    .venv/bin/python bench/serve.py --baseline ../old      # aigc serve from this tree against another
                                                          # checkout, alternating rounds in one run

With --baseline, only the aigc serve load runs, for both trees (`python -m aigc_cli serve` with the
tree on PYTHONPATH, from a directory outside both), in alternating rounds so that a machine whose
load drifts treats both alike; the figures go into RESULTS-serve.md's section "Against a baseline"
(the rest of the file is kept).

The model is GPT-2 small's shape with random weights (bench/make_model.py). Every request samples
(temperature 1, no top-k) exactly --tokens tokens where the server can force it (aigc: min_tokens;
transformers serve has no such parameter, and random weights rarely end early).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from batch import _cpu_name, make_prompts  # noqa: E402
from make_model import build  # noqa: E402

AIGC = str(ROOT / ".venv" / "bin" / "aigc")
TRANSFORMERS = str(ROOT / ".venv" / "bin" / "transformers")


def start(
    cmd: list[str], log: Path, port_from_log: bool, port: int, env: dict[str, str], cwd: Path | None = None
) -> tuple[subprocess.Popen, str]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    deadline = time.monotonic() + 300
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        if port_from_log:
            for line in log.read_text().splitlines():
                if "listening on http://127.0.0.1:" in line:
                    url = "http://127.0.0.1:" + line.split("127.0.0.1:")[1].split()[0]
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not get ready")


def one_request(url: str, model: str, prompt: str, tokens: int, force: bool) -> tuple[float, float, int]:
    """(time to first token, latency, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "stream": True}
    if force:
        body.update(min_tokens=tokens, stream_options={"include_usage": True})
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.monotonic()
    first, count, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for c in event.get("choices") or []:
                if c.get("text"):
                    count += 1
                    if first is None:
                        first = time.monotonic() - started
    return (first if first is not None else float("nan")), time.monotonic() - started, usage if usage is not None else count


def load(url: str, model: str, clients: int, per_client: int, tokens: int, force: bool) -> dict[str, float]:
    prompts = make_prompts(clients * per_client)
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            r = one_request(url, model, prompts[k * per_client + j], tokens, force)
            with lock:
                results.append(r)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ttft = sorted(r[0] for r in results)
    lat = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "tokens": sum(r[2] for r in results),
        "tok_s": sum(r[2] for r in results) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "lat_p50": statistics.median(lat),
        "lat_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def offline(model: Path, n: int, tokens: int) -> tuple[float, float]:
    """`aigc generate -f` over the 32-client prompts: (tokens/s over the whole process, over generation only)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "prompts.txt", Path(tmp) / "out.jsonl"
        src.write_text("\n".join(make_prompts(n)) + "\n")
        started = time.monotonic()
        subprocess.run(
            [AIGC, "generate", "-f", str(src), "-o", str(out), "--model", str(model), "--max-new-tokens", str(tokens),
             "--min-new-tokens", str(tokens), "--top-k", "0", "--seed", "1"],
            check=True, stderr=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
        total = sum(json.loads(line)["completion_tokens"] for line in out.read_text().splitlines())
        load_started = time.monotonic()
        subprocess.run([AIGC, "info", "--model", str(model)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load_time = time.monotonic() - load_started
    return total / wall, total / max(1e-9, wall - load_time)


def readme_example(url: str) -> list[float]:
    env = {**os.environ, "AIGC_SERVER": url}
    times = []
    for _ in range(5):
        started = time.monotonic()
        subprocess.run([AIGC, "generate", "Hello, how are you?", "-n", "5"], check=True, env=env, stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - started)
    return times


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()


def _cpu_flags() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def against_baseline(args: argparse.Namespace, model: Path, clients: list[int]) -> None:
    """aigc serve from this tree and from `args.baseline`, the same load in alternating rounds."""
    trees = {"this tree": ROOT, "baseline": Path(args.baseline).resolve()}
    figures: dict[str, dict[int, list[float]]] = {name: {c: [] for c in clients} for name in trees}
    log_dir = Path(tempfile.mkdtemp())
    for k in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(tree)}
            cmd = [sys.executable, "-m", "aigc_cli", "serve", "--model", str(model), "--port", "0"]
            proc, url = start(cmd, log_dir / f"{name}-{k}.log", True, 0, env, cwd=log_dir)
            try:
                one_request(url, str(model), "Warm up", 4, True)
                for c in clients:
                    r = load(url, str(model), c, args.per_client, args.tokens, True)
                    figures[name][c].append(r["tok_s"])
                    print(f"round {k + 1} {name} {c} clients: {r['tok_s']:.1f} tok/s", flush=True)
            finally:
                proc.terminate()
                proc.wait()
    base = trees["baseline"]
    lines = [
        "## Against a baseline",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {_cpu_name()}, {os.cpu_count()} cores, no GPU "
        f"(shared with other work: load average {os.getloadavg()[0]:.1f} at the end); `bench/serve.py {' '.join(sys.argv[1:])}`"
        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}): "
        f"this tree at {_git(ROOT, 'rev-parse', '--short', 'HEAD')} against {_git(base, 'rev-parse', '--short', 'HEAD')}, "
        f"{args.rounds} alternating rounds each, {args.per_client} streamed requests of {args.tokens} sampled tokens per client; "
        "tok/s per round, then the ratio of the medians.",
        "",
        f"CPU flags: {_cpu_flags()}",
        "",
        "| clients | this tree tok/s | baseline tok/s | this tree / baseline |",
        "|---:|---|---|---:|",
    ]
    for c in clients:
        ours, theirs = figures["this tree"][c], figures["baseline"][c]
        lines.append(f"| {c} | {', '.join(f'{x:.1f}' for x in ours)} | {', '.join(f'{x:.1f}' for x in theirs)} | "
                     f"{statistics.median(ours) / statistics.median(theirs):.3f} |")
    out = Path(args.out)
    kept = out.read_text().split("\n## Against a baseline")[0].rstrip("\n") if out.exists() else "# Server benchmark (bench/serve.py)"
    out.write_text(kept + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--per-client", type=int, default=4, help="requests each client sends, one after the other")
    ap.add_argument("--transformers-per-client", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default=str(HERE / "RESULTS-serve.md"))
    ap.add_argument("--baseline", help="another checkout of aigc: compare aigc serve from it with this tree's (and nothing else)")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline: alternating rounds per tree")
    args = ap.parse_args()
    model = build()
    clients = [int(c) for c in args.clients.split(",")]
    if args.baseline:
        against_baseline(args, model, clients)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows: list[tuple[str, int, dict[str, float]]] = []
    log_dir = Path(tempfile.mkdtemp())

    proc, url = start([AIGC, "serve", "--model", str(model), "--port", "0"], log_dir / "aigc.log", True, 0, env)
    try:
        one_request(url, str(model), "Warm up", 4, True)
        for c in clients:
            r = load(url, str(model), c, args.per_client, args.tokens, True)
            rows.append(("aigc serve", c, r))
            print("aigc serve", c, {k: round(v, 3) for k, v in r.items()}, flush=True)
        example = readme_example(url)
        print("README example via --server:", [round(t, 3) for t in example], flush=True)
    finally:
        proc.terminate()
        proc.wait()
    proc, url = start([AIGC, "serve", "--model", str(model), "--port", "0", "--quantize", "int8"], log_dir / "int8.log", True, 0, env)
    try:
        one_request(url, str(model), "Warm up", 4, True)
        example_int8 = readme_example(url)
        print("README example via --server, int8 server:", [round(t, 3) for t in example_int8], flush=True)
    finally:
        proc.terminate()
        proc.wait()

    t_notes: list[str] = []
    if not args.skip_transformers:
        for label, extra in (("transformers serve", []), ("transformers serve --continuous-batching", ["--continuous-batching"])):
            port = 18000 + len(t_notes)
            try:
                proc, url = start([TRANSFORMERS, "serve", str(model), "--port", str(port), "--device", "cpu", *extra],
                                  log_dir / f"tf{len(t_notes)}.log", False, port, env)
            except RuntimeError as exc:
                t_notes.append(f"{label}: did not start ({str(exc).splitlines()[-1][:200]})")
                continue
            try:
                one_request(url, str(model), "Warm up", 4, False)
                for c in clients:
                    r = load(url, str(model), c, args.transformers_per_client, args.tokens, False)
                    rows.append((label, c, r))
                    print(label, c, {k: round(v, 3) for k, v in r.items()}, flush=True)
                t_notes.append(f"{label}: ran")
            except Exception as exc:  # noqa: BLE001 - reported in the results
                t_notes.append(f"{label}: failed under load ({type(exc).__name__}: {exc})")
            finally:
                proc.terminate()
                proc.wait()

    biggest = max(clients)
    off_whole, off_gen = offline(model, biggest * args.per_client, args.tokens)
    print(f"aigc generate -f offline: {off_whole:.1f} tok/s whole process, {off_gen:.1f} without the load", flush=True)

    lines = [
        "# Server benchmark (bench/serve.py)",
        "",
        f"Run {datetime.date.today()} on {_cpu_name()}, {os.cpu_count()} cores, no GPU; GPT-2 small's shape with random "
        f"weights; every request streams {args.tokens} sampled tokens (temperature 1, no top-k). aigc serve: "
        f"{args.per_client} requests per client, one after the other; transformers serve: "
        f"{args.transformers_per_client} per client (it is slower).",
        "",
        "| server | clients | requests | tokens | tok/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, c, r in rows:
        lines.append(
            f"| {label} | {c} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {r['ttft_p50'] * 1000:.0f} ms | "
            f"{r['ttft_p99'] * 1000:.0f} ms | {r['lat_p50']:.2f} s | {r['lat_p99']:.2f} s |"
        )
    lines += [
        "",
        f"`aigc generate -f` offline on the {biggest * args.per_client} prompts of the {biggest}-client run: "
        f"{off_whole:.1f} tok/s over the whole process, {off_gen:.1f} tok/s without the model load.",
        "",
        "README example (`aigc generate \"Hello, how are you?\" -n 5` with AIGC_SERVER set), whole process, 5 runs: "
        + ", ".join(f"{t:.2f} s" for t in example)
        + "; against `aigc serve --quantize int8`: "
        + ", ".join(f"{t:.2f} s" for t in example_int8),
        "",
    ]
    if t_notes:
        lines += ["transformers serve: " + "; ".join(t_notes), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
