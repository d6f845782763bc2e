"""`ftd server` brings up Prefect (API + UI) and MLflow on 127.0.0.1 and stops them completely."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


@pytest.mark.e2e  # over 15 s: real processes
def test_server_command_starts_both_uis_and_stops_cleanly(tmp_path: Path) -> None:
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "server", "--artifacts-dir", str(tmp_path / "artifacts"),
         "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("MLFLOW_TRACKING_URI" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        output = "".join(lines)
        assert f"Prefect UI  http://127.0.0.1:{prefect_port}" in output, output
        assert _get(f"http://127.0.0.1:{prefect_port}/api/health") == 200
        assert _get(f"http://127.0.0.1:{prefect_port}/") == 200  # the UI itself
        assert _get(f"http://127.0.0.1:{mlflow_port}/health") == 200
        assert (tmp_path / "artifacts" / "mlflow.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for port in (prefect_port, mlflow_port):  # nothing is left listening
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
