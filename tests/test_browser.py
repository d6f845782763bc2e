"""The UIs in a real browser: `ftd server` (Prefect + MLflow on 127.0.0.1), the default flow run
against both, then headless Chromium (Debian's `chromium`, driven by playwright, closed-network
flags) opens the flow-run page — the run, its task runs, its report artifact — and MLflow's
registered-model page. Screenshots go to artifacts/test-output/screenshots/.

Chromium is installed by the test set-up (`apt-get install chromium`) when it is missing and the
machine allows it; otherwise the test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.servers import start_servers, stop_servers, wait_healthy
from tests.conftest import DEFAULT_CONFIG, ROOT, seed_store

pytestmark = pytest.mark.e2e
SCREENSHOTS = ROOT / "artifacts" / "test-output" / "screenshots"
CLOSED_NETWORK = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-first-run",
                  "--metrics-recording-only", "--disable-features=Translate,OptimizationHints,MediaRouter"]  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # no apt access: skipped below
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=300,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed here (apt-get install chromium)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_and_mlflow_uis_show_the_run(tmp_path: Path, trained_default: Path) -> None:
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    artifacts = seed_store(trained_default, tmp_path / "artifacts")
    prefect_port, mlflow_port = free_port(), free_port()
    saved = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    servers = start_servers(artifacts, prefect_port, mlflow_port, tmp_path / "logs")
    try:
        wait_healthy(servers, timeout=240)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
        summary_path = tmp_path / "summary.json"
        run = subprocess.run(
            [sys.executable, "-m", "app.cli", "run", str(DEFAULT_CONFIG), "--set", f"artifacts_dir={artifacts}",
             "--set", f"tracking.uri=http://127.0.0.1:{mlflow_port}", "--summary", str(summary_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        import json

        summary = json.loads(summary_path.read_text())
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CLOSED_NETWORK)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{prefect_port}/runs/flow-run/{summary['prefect_flow_run_id']}")
            page.get_by_text("finetune_to_deploy").first.wait_for(timeout=120_000)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "prefect-flow-run.png"))
            page.get_by_text("Task Runs", exact=True).first.click()
            for task in ("sft[numbers]", "build[onnx-fp32]", "smoke[numbers/onnx-fp32]"):
                page.get_by_text(task).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "prefect-task-runs.png"))
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("ftd-report-tiny-llama").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "prefect-artifacts.png"))

            page.goto(f"http://127.0.0.1:{mlflow_port}/#/models/tiny-llama-adapter")
            page.get_by_text("Version 1").first.wait_for(timeout=120_000)
            page.screenshot(path=str(SCREENSHOTS / "mlflow-registered-model.png"))
            browser.close()
    finally:
        stop_servers(servers)
        for key in [k for k in os.environ if k.startswith("PREFECT_")]:
            del os.environ[key]
        os.environ.update(saved)
