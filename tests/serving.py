"""Servers for tests: `aigc serve` in a subprocess on a free loopback port (`Server`), and the app
in this process on a thread (`InProcessServer`, for tests that reach into the engine)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

KEY = "test-key"
MODEL = "tiny-random"


class Server:
    def __init__(self, tmp: Path, *args: str, key: str | None = KEY, model: str = MODEL) -> None:
        self.log = tmp / f"server-{time.monotonic_ns()}.log"
        self.model = model
        env = {k: v for k, v in os.environ.items() if k not in ("AIGC_API_KEY", "AIGC_SERVER")}
        cmd = [sys.executable, "-m", "aigc_cli", "serve", "--model", model, "--port", "0", *args]
        if key is not None:
            cmd += ["--api-key", key]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.port = self._port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if "listening on http://127.0.0.1:" in line:
                    return int(line.split("127.0.0.1:")[1].split()[0])
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError("the server did not start: " + self.log.read_text())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError("the server did not get ready: " + self.log.read_text())

    def client(self, key: str = KEY, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def raw(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)




class InProcessServer:
    """The server's app on uvicorn in a thread of this process, on a free port: tests can patch
    the engine (`Scheduler.fault`) and see it act inside a live server."""

    def __init__(self, model: str = MODEL, **options: Any) -> None:
        import uvicorn

        from aigc_cli.core.modelspec import ModelSpec
        from aigc_cli.frontends.server.routes import create_app
        from aigc_cli.frontends.server.state import ServerOptions, ServerState

        self.lines: list[str] = []
        self.state = ServerState(ServerOptions(spec=ModelSpec.parse(model), port=0, **options), self.lines.append)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.state), log_level="critical", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.state.loop is None:
            assert time.monotonic() < deadline and self.thread.is_alive(), self.lines
            time.sleep(0.05)

    def raw(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def sse_events(data: bytes) -> list[Any]:
    """The events of a server-sent event stream: JSON objects, and "[DONE]"."""
    out: list[Any] = []
    for line in data.decode().splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
