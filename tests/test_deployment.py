"""Deployments: a real Prefect server on 127.0.0.1, `ftd serve` registering a scheduled deployment,
and a run triggered through the API exactly as the UI's "Run" button does; it completes and
publishes its report artifact. `prefect.yaml` (the work-pool path) deploys to the same server
with its schedule.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, ROOT, seed_store

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s")


def against(api: str):
    """Point this process's Prefect client at `api`. (Prefect reads its settings once per process:
    changing os.environ after another test imported prefect would be ignored, and the client would
    quietly start a temporary server of its own.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api})


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_served_deployment_is_scheduled_and_runs_when_triggered(tmp_path: Path, trained_default: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    artifacts = seed_store(trained_default, tmp_path / "artifacts")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=(tmp_path / "server.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    served = None
    try:
        wait_for(f"{api}/health", server)
        client_env = {**env, "PREFECT_API_URL": api, "PWD": str(ROOT)}
        served = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", str(DEFAULT_CONFIG), "--set", f"artifacts_dir={artifacts}",
             "--name", "nightly", "--cron", "0 3 * * *"],
            cwd=ROOT, env=client_env, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with against(api):  # this test's own client calls
            state, report, schedules = asyncio.run(_trigger_and_wait(served, tmp_path))
        assert schedules and schedules[0] == "0 3 * * *"
        assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert report is not None and "## Registered versions" in report

        # The work-pool path: prefect.yaml deploys both flows, the nightly one with its schedule.
        pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "ftd-process", "--type",
                               "process"], cwd=ROOT, env=client_env, capture_output=True, text=True)  # fmt: skip
        assert pool.returncode == 0, pool.stdout + pool.stderr
        deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT,
                                env=client_env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        with against(api):
            names = asyncio.run(_deployments())
        assert names["finetune_to_deploy/tiny-llama-nightly"] == ["0 3 * * *"]
        assert "ftd_sweep/tiny-llama-lora-sweep" in names
    finally:
        if served is not None:
            stop(served)
        stop(server)


async def _trigger_and_wait(served: subprocess.Popen, tmp_path: Path):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = None
        deadline = time.monotonic() + 300
        while deployment is None:
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the deployment never appeared"
            try:
                deployment = await client.read_deployment_by_name("finetune_to_deploy/nightly")
            except Exception:
                await asyncio.sleep(1)
        schedules = [s.schedule.cron for s in deployment.schedules]
        run = await client.create_flow_run_from_deployment(deployment.id)  # what the UI's "Run" button does
        deadline = time.monotonic() + 1200
        while True:
            run = await client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            assert time.monotonic() < deadline, "the triggered run did not finish"
            await asyncio.sleep(2)
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ftd-report-tiny-llama"]))
        )
        report = artifacts[0].data if artifacts else None
        return run.state.type.value, report, schedules


async def _deployments() -> dict[str, list]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": [s.schedule.cron for s in d.schedules if hasattr(s.schedule, "cron")]
                for d in deployments}  # fmt: skip
