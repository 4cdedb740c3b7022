"""Where an `aigc generate` job runs: this process, a running `aigc serve` (--server) or a Ray
cluster (--backend ray); the flags of each checked before anything is opened (usage errors), the
engine loaded only when the job starts."""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

from aigc_cli.core.errors import UsageError
from aigc_cli.core.modelspec import ModelSpec
from aigc_cli.frontends.cli import options as o
from aigc_cli.frontends.cli.render import Messages


class Backend(str, Enum):
    local = "local"
    ray = "ray"


def remote_options(server: str | None, api_key: str | None, connect_timeout: float | None, read_timeout: float | None) -> Any:
    """With --server: what `RemoteEngine.connect` needs, its URL and timeouts checked (usage errors)."""
    if server is None:
        if connect_timeout is not None or read_timeout is not None:
            raise UsageError("--connect-timeout and --read-timeout: only with --server (or AIGC_SERVER)")
        return None
    from aigc_cli.frontends.client import Timeouts, server_address

    server_address(server)
    return server, api_key, Timeouts.checked(connect_timeout, read_timeout)


def job_loader(
    spec: ModelSpec, named: str | None, remote: tuple[str, str | None, Any] | None, backend: Backend, ray: tuple[Any, ...], messages: Messages
) -> Callable[[], Any]:
    """Where the job runs, checked now (usage errors before anything is opened), loaded later."""
    address, workers, cpus, gpus = ray
    server = remote[0] if remote is not None else None
    if server is not None and not spec.defaults:
        raise UsageError("--device, --dtype and --quantize: set them where the server runs (aigc serve), not with --server")
    if backend is Backend.ray:
        if server is not None:
            raise UsageError("--backend ray: generates on a Ray cluster; --server on a running aigc serve: choose one")
        if workers < 1 or cpus <= 0 or gpus < 0:
            raise UsageError(f"--workers must be at least 1, --worker-cpus above 0 and --worker-gpus not negative (got {workers}, {cpus:g}, {gpus:g})")
        from aigc_cli.frontends.ray_backend import RayEngine, import_ray

        import_ray()  # the missing extra is a usage error before anything is opened

        def on_ray() -> Any:
            with messages.status(f"Starting {workers} Ray workers with {spec.name}..."):
                return RayEngine(spec, address, workers, cpus, gpus)

        return on_ray
    if ray != (None, 2, 1.0, 0.0):
        raise UsageError("--ray-address, --workers, --worker-cpus and --worker-gpus: only with --backend ray")
    if remote is not None:
        from aigc_cli.frontends.client import RemoteEngine

        url, api_key, timeouts = remote
        return lambda: RemoteEngine.connect(url, api_key, named, timeouts)
    return lambda: o.load_engine(spec, messages)
