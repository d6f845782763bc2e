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
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import FtdError

HOST = "127.0.0.1"


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    health_url: str
    ui_url: str


def start_servers(artifacts_dir: Path, prefect_port: int, mlflow_port: int, log_dir: Path) -> list[Server]:
    from ftd.environment import configure_environment

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


def wait_healthy(servers: list[Server], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
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
        time.sleep(0.5)


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
        with suppress(ProcessLookupError):  # children left in the group (MLflow's job runners)
            os.killpg(server.process.pid, signal.SIGKILL)


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
