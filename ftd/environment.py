"""Process environment defaults, applied before Prefect or MLflow are imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftd.store import file_lock


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


def prepare_local_stores(artifacts_dir: Path, tracking_uri: str) -> None:
    """Create or migrate the SQLite databases of Prefect and MLflow one process at a time.

    Two `ftd run`s sharing an artifacts folder would otherwise both migrate the same fresh
    databases at once (Prefect's temporary server at start-up, MLflow at its first call), and one
    of them fails with "duplicate column" / "table already exists". Once migrated, SQLite's own
    locking is enough for the runs' writes. A marker records the library versions that migrated
    them, so later runs skip the ~3 s of schema checks until Prefect or MLflow is upgraded."""
    import asyncio

    if stores_ready(artifacts_dir, tracking_uri):
        return
    with file_lock(Path(artifacts_dir).resolve() / "locks" / "databases.lock"):
        if not os.environ.get("PREFECT_API_URL"):  # the temporary server will use PREFECT_HOME's database
            from prefect.server.database import provide_database_interface

            asyncio.run(provide_database_interface().create_db())
        if tracking_uri.startswith("sqlite:///"):
            import mlflow

            mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)
        marker = _ready_marker(artifacts_dir)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(_ready_stamp(artifacts_dir, tracking_uri))
        tmp.replace(marker)


def stores_ready(artifacts_dir: Path, tracking_uri: str) -> bool:
    """True when both local databases exist and were migrated by the installed Prefect and MLflow."""
    marker = _ready_marker(artifacts_dir)
    if not marker.is_file() or marker.read_text() != _ready_stamp(artifacts_dir, tracking_uri):
        return False
    needed = [] if os.environ.get("PREFECT_API_URL") else [_prefect_database()]
    if tracking_uri.startswith("sqlite:///"):
        needed.append(Path(tracking_uri.removeprefix("sqlite:///")))
    return all(p is not None and p.is_file() for p in needed)


def _ready_marker(artifacts_dir: Path) -> Path:
    return Path(artifacts_dir).resolve() / "locks" / "databases.ready"


def _ready_stamp(artifacts_dir: Path, tracking_uri: str) -> str:
    """What the marker vouches for. Paths inside the artifacts folder are recorded relative to it,
    so a copied or moved folder (databases included) is still recognised as migrated."""
    from importlib.metadata import version

    root = Path(artifacts_dir).resolve()

    def relative(value: str) -> str:
        return value.replace(str(root), "<artifacts>")

    return json.dumps({"prefect": version("prefect"), "mlflow": version("mlflow"), "tracking_uri": relative(tracking_uri),
                       "prefect_database": relative(str(_prefect_database()))})  # fmt: skip


def _prefect_database() -> Path | None:
    """The SQLite file Prefect's temporary server uses (PREFECT_HOME/prefect.db unless configured)."""
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    )
    if url:
        return Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "prefect.db"
