"""Process environment defaults, applied before Prefect or MLflow are imported."""

from __future__ import annotations

import os
from pathlib import Path


def configure_environment(artifacts_dir: Path) -> None:
    """Defaults that keep Prefect's state and results inside the artifacts folder, offline.

    Must run before `prefect` is imported; explicit environment settings win."""
    root = Path(artifacts_dir).resolve()
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / "prefect" / "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    # The temporary API server needs more than Prefect's default 20 s on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
