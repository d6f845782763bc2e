"""`ftd server`: the Prefect server (API + UI) and the MLflow tracking server on 127.0.0.1, over
the same stores `ftd run` uses by default (artifacts/prefect, artifacts/mlflow.db).

Each server runs in its own process group, and the whole group is stopped on exit: MLflow's
server starts job-runner children that outlive a plain SIGTERM of its main process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from ftd.environment import configure_environment, stores_ready
from ftd.errors import FtdError

HOST = "127.0.0.1"


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    health_url: str
    ui_url: str


def start_servers(artifacts_dir: Path, prefect_port: int, mlflow_port: int, log_dir: Path) -> list[Server]:

    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    configure_environment(artifacts_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # The UI calls the API at this URL; Prefect's default is port 4200 whatever port it serves on.
    env["PREFECT_UI_API_URL"] = env["PREFECT_SERVER_UI_API_URL"] = f"http://{HOST}:{prefect_port}/api"
    commands = {
        "prefect": ([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(prefect_port)],
                    f"http://{HOST}:{prefect_port}/api/health", f"http://{HOST}:{prefect_port}"),
        "mlflow": ([sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{artifacts_dir / 'mlflow.db'}"],
                   f"http://{HOST}:{mlflow_port}/health", f"http://{HOST}:{mlflow_port}"),
    }  # fmt: skip
    servers = []
    for name, (command, health, ui) in commands.items():
        with open(log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        servers.append(Server(name, process, health, ui))
    return servers


def start_model_server(model_uri: str, tracking_uri: str, port: int, log_dir: Path) -> Server:
    """MLflow's scoring server on a registered model, in this environment (`--env-manager local`),
    on 127.0.0.1, in its own process group (stopped with `stop_servers`)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # MLflow execs `uvicorn` by name: this environment's bin first (a venv used without activating it)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=path)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", HOST, "-p", str(port)]  # fmt: skip
    with open(log_dir / f"model-server-{port}.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server("model", process, f"http://{HOST}:{port}/ping", f"http://{HOST}:{port}")


def wait_healthy(
    servers: list[Server], timeout: float = 180.0, interval: float = 0.5, idle_work: Iterable[Callable] = ()
) -> None:
    """Poll until every server answers; between polls run `idle_work` items instead of sleeping."""
    deadline = time.monotonic() + timeout
    idle_work = list(idle_work)
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                raise FtdError(f"{server.name} server exited with code {server.process.returncode}; see its log")
            try:
                with urllib.request.urlopen(server.health_url, timeout=2) as response:
                    if response.status == 200:
                        pending.remove(server)
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            raise FtdError(f"{', '.join(s.name for s in pending)} not healthy after {timeout:.0f} s")
        if pending and idle_work:
            idle_work.pop(0)()
        elif pending:
            time.sleep(interval)


def stop_servers(servers: list[Server], grace: float = 15) -> None:
    for server in servers:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
        with suppress(ProcessLookupError):  # children left in the group (MLflow's job runners)
            os.killpg(server.process.pid, signal.SIGKILL)


def start_run_api_server(artifacts_dir: Path, tracking_uri: str) -> Callable[[], None] | None:
    """Prefect's API for one `ftd run`, started at once in its own process; returns `wait`.

    Without PREFECT_API_URL, Prefect starts a temporary server itself, but only when the flow
    begins, and it imports Prefect's server into the run's process first: ~5 s before the first
    task. This starts the same server (Prefect's uvicorn app, UI off, on the same database) in
    the background while the pre-flight checks run, and points PREFECT_API_URL at it. Call only
    when the database is already migrated (`environment.stores_ready`): migrations stay under
    `prepare_local_stores`'s lock. `wait()` blocks until the API answers (falling back to
    Prefect's own temporary server if this one died). The server is stopped when the process exits,
    after Prefect's exit handlers have sent their last logs and events. Returns None, starting
    nothing, when PREFECT_API_URL names a server or the stores are not migrated yet."""
    import atexit
    import socket
    from importlib.util import find_spec

    if os.environ.get("PREFECT_API_URL") or not stores_ready(artifacts_dir, tracking_uri):
        return None
    log_dir = Path(artifacts_dir).resolve() / "logs"

    with socket.socket() as sock:  # a free port; the server binds it a moment later
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    prefect_dir = Path(find_spec("prefect").origin).parent
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "prefect-run-server.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent)  # fmt: skip
    server = Server("prefect", process, f"http://{HOST}:{port}/api/health", f"http://{HOST}:{port}")
    os.environ["PREFECT_API_URL"] = f"{server.ui_url}/api"
    atexit.register(stop_servers, [server], 5)  # registered before Prefect's: runs after them

    def wait(idle_work: Iterable[Callable] = ()) -> None:
        try:
            wait_healthy([server], timeout=180.0, interval=0.05, idle_work=idle_work)
        except FtdError:
            stop_servers([server], 5)
            os.environ.pop("PREFECT_API_URL")  # Prefect starts its own temporary server instead

    return wait


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the run's process dies, even by
    SIGKILL, when no exit handler can stop it (Linux; elsewhere the exit handler alone)."""
    import ctypes

    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve(artifacts_dir: Path, prefect_port: int, mlflow_port: int) -> int:
    servers = start_servers(artifacts_dir, prefect_port, mlflow_port, Path(artifacts_dir) / "logs")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        wait_healthy(servers)
        print(f"ftd: Prefect UI  {servers[0].ui_url}", flush=True)
        print(f"ftd: MLflow UI   {servers[1].ui_url}", flush=True)
        print(f"ftd: to send runs to this Prefect server: export PREFECT_API_URL={servers[0].ui_url}/api", flush=True)
        print(f"ftd: and to this MLflow server:           export MLFLOW_TRACKING_URI={servers[1].ui_url}", flush=True)
        while not stopping and all(s.process.poll() is None for s in servers):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop_servers(servers)
    return 0
