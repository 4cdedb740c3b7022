"""Observability: one access-log line per request, and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from aigc_cli.frontends.server.state import ServerState
from aigc_cli.protocol.errors import APIError


def escaped(text: str, limit: int = 300) -> str:
    """Text from a client made safe for a log line: control characters, quotes, backslashes and
    anything that is not printable (a lone surrogate) written as escapes, so that a request can
    never forge a log line or reach the terminal; cut to `limit` characters."""
    out = []
    for ch in text[:limit]:
        if ch in '"\\' or not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii") if ch != '"' else '\\"')
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")


class AccessLog:
    """One line per request on stderr once its response is complete: status, tokens, latency, the
    path escaped. A client that went away is one quiet line (status 499), never a traceback; the
    request's clean-ups (its claim on the engine) run whatever happened."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except OSError:  # the connection broke while we wrote to it
            pass
        except Exception as exc:  # noqa: BLE001 - a bug: one line in the log and a 500, never a traceback
            self.state.log(f"aigc serve: internal error: {type(exc).__name__}: {escaped(str(exc))}")
            if not status[0]:
                status[0] = 500
                body = APIError(500, f"internal error ({type(exc).__name__})", code="internal_error").json()
                await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
        finally:
            for cleanup in scope.get("aigc_cleanup", ()):
                cleanup()
            self._line(scope, status[0] or 499, time.monotonic() - started)  # 499: nothing was sent, the client went away

    def _line(self, scope: dict[str, Any], code: int, seconds: float) -> None:
        used = scope.get("aigc_usage") or {}
        tokens = f" prompt_tokens={used['prompt']} completion_tokens={used['completion']}" if "prompt" in used else ""
        client = (scope.get("client") or ("-", 0))[0]
        path = escaped(scope.get("path", ""))
        self.state.log(f'{escaped(str(client))} "{escaped(scope.get("method", ""))} {path}" {code}{tokens} {seconds:.3f}s')
        if self.state.metrics is not None:
            self.state.metrics.requests.labels(str(code)).inc()


class Metrics:
    """Prometheus text: requests by status, running and waiting sequences, tokens, time to first token."""

    def __init__(self, state: ServerState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("aigc_requests", "HTTP requests by status", ["status"], registry=self.registry)
        self.ttft = Histogram(
            "aigc_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        class _Engine:
            def collect(self) -> Any:
                loop = state.loop
                running = GaugeMetricFamily("aigc_sequences_running", "Sequences decoding now")
                waiting = GaugeMetricFamily("aigc_sequences_waiting", "Sequences queued for a slot")
                generated = CounterMetricFamily("aigc_generated_tokens", "Tokens generated")
                prompt = CounterMetricFamily("aigc_prompt_tokens", "Prompt tokens prefilled")
                running.add_metric([], loop.running if loop else 0)
                waiting.add_metric([], loop.waiting if loop else 0)
                generated.add_metric([], loop.stats.generated_tokens if loop else 0)
                prompt.add_metric([], loop.stats.prompt_tokens if loop else 0)
                return [running, waiting, generated, prompt]

        self.registry.register(_Engine())

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


# -- running it ----------------------------------------------------------------------------------


