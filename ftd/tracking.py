"""Every MLflow call the project makes lives here.

One MLflow run per flow run: the flattened config as params, loss curves, accuracies, build
times and smoke metrics as metrics. Adapters and engines are logged as run artifacts and
registered as versions of registered models, tagged with their lineage. Registration is
idempotent: a version whose `ftd.key` tag equals the artifact's key is reused, so a cache-hit
rerun never creates duplicate versions.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from ftd.config import ExperimentConfig, flatten
from ftd.errors import FtdError
from ftd.store import digest, file_lock

T = TypeVar("T")
KEY_TAG = "ftd.key"
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}


def tracking_uri(cfg: ExperimentConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return default_tracking_uri(cfg.artifacts_dir)


def default_tracking_uri(artifacts_dir: str | Path) -> str:
    """`$MLFLOW_TRACKING_URI`, else the artifacts folder's SQLite database."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(artifacts_dir).resolve() / 'mlflow.db').as_posix()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any compute if a configured tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise FtdError(f"tracking.uri: MLflow server {uri} answered /health with {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FtdError(
                f"tracking.uri: MLflow server {uri} is not reachable ({reason}); start it or unset the URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, first_delay: float = 0.5) -> T:
    """Retry transient tracking failures with exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # MLflow raises many types for network faults
            if getattr(exc, "error_code", None) in PERMANENT_ERRORS:
                raise FtdError(f"MLflow: {what} failed: {exc}") from exc
            if attempt == attempts:
                raise FtdError(f"MLflow: {what} failed after {attempts} attempts: {exc}") from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def render_loss_curve(points: list[dict], title: str, path: Path) -> None:
    """Training loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def preload(uri: str) -> None:
    """Import MLflow and open the tracking store now (the store is cached per URI), while
    something else is being waited for, rather than when the flow's first log call needs it."""
    import mlflow

    mlflow.MlflowClient(uri)


class Tracker:
    """The MLflow run of one flow run."""

    def __init__(self, cfg: ExperimentConfig, parent_run_id: str | None = None, run_name: str | None = None):
        import mlflow

        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.run_name = run_name or cfg.experiment
        self.mlflow = mlflow
        self.uri = tracking_uri(cfg)
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        self.experiment_name = cfg.tracking.experiment or cfg.experiment
        self.run_id: str | None = None
        self.created_versions: list[tuple[str, str]] = []

    def __enter__(self) -> Tracker:
        experiment = with_retries(lambda: self.client.get_experiment_by_name(self.experiment_name), "get experiment")
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.cfg.artifacts_dir).resolve() / "mlflow-artifacts").as_uri()
            experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else None
        run = with_retries(
            lambda: self.client.create_run(experiment_id, run_name=self.run_name, tags=tags), "create run"
        )
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        params = [self.mlflow.entities.Param(k, v[:6000]) for k, v in flatten(self.cfg).items()]
        for start in range(0, len(params), 100):
            batch = params[start : start + 100]
            with_retries(lambda batch=batch: self.client.log_batch(self.run_id, params=batch), "log params")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from prefect.exceptions import TerminationSignal

        stopped = isinstance(exc, (TerminationSignal, KeyboardInterrupt))
        status = "FINISHED" if exc_type is None else "KILLED" if stopped else "FAILED"
        if stopped:
            self.set_tag("ftd.error", f"stopped by {'SIGTERM' if isinstance(exc, TerminationSignal) else 'SIGINT'}")
        elif exc is not None:
            self.set_tag("ftd.error", str(exc)[:5000])
        with_retries(lambda: self.client.set_terminated(self.run_id, status=status), "end run")

    # ------------------------------------------------------------ logging

    def set_tag(self, key: str, value: Any) -> None:
        with_retries(lambda: self.client.set_tag(self.run_id, key, str(value)), f"tag {key}")

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_metric_name(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            with_retries(lambda: self.client.log_batch(self.run_id, metrics=batch), "log metrics")

    def log_curve(self, name: str, points: list[dict], png: Path | None = None) -> None:
        """The curve as an MLflow metric history, and its plot (rendered at training time, so a
        rerun whose training is cached does not load matplotlib) as plots/<name>.png."""
        import shutil
        import tempfile

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_metric_name(name), float(p["loss"]), now, int(p["step"])) for p in points]
        for start in range(0, len(batch), 500):
            part = batch[start : start + 500]
            with_retries(lambda part=part: self.client.log_batch(self.run_id, metrics=part), "log curve")
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"{_metric_name(name)}.png"
            if png is not None and png.is_file():
                shutil.copyfile(png, named)
            else:
                render_loss_curve(points, name, named)
            with_retries(lambda: self.client.log_artifact(self.run_id, str(named), "plots"), "log plot")

    def log_text(self, text: str, path: str) -> None:
        with_retries(lambda: self.client.log_text(self.run_id, text, path), f"log {path}")

    # ------------------------------------------------------------ registry

    def register(self, model_name: str, directory: Path, artifact_path: str, key: str, tags: dict[str, Any],
                 write: Callable[[Path], dict | None] | None = None) -> dict:  # fmt: skip
        """Log `directory` under the run and register it, unless a version with this key exists.

        `write(folder)`, when given, writes what is logged instead (an MLflow Model around
        `directory`) and may return tags to add (or raise: nothing is registered); it runs only
        when a new version is created. Look-up and creation happen under
        a file lock per model name in the artifacts folder: two runs finishing together would
        otherwise both find no version and both register one (or both try to create the registered
        model, and one fails)."""
        with self._registry_lock(model_name):
            existing = self.find_version(model_name, key)
            if existing is not None:
                return {"name": model_name, "version": existing.version, "new": False, "run_id": existing.run_id,
                        "tags": dict(existing.tags)}  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                if write is not None:
                    directory = Path(tmp) / "model"
                    tags = {**tags, **(write(directory) or {})}  # a check of what was written may add tags
                with_retries(
                    lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path),
                    f"log {artifact_path}",
                )
            try:
                self.client.get_registered_model(model_name)
            except Exception:
                with_retries(lambda: self.client.create_registered_model(model_name), f"create model {model_name}")
            all_tags = {KEY_TAG: key, **{k: str(v) for k, v in tags.items()}}
            version = with_retries(
                lambda: self.client.create_model_version(
                    model_name, source=f"{self.artifact_uri}/{artifact_path}", run_id=self.run_id, tags=all_tags
                ),
                f"register {model_name}",
            )
        self.created_versions.append((model_name, version.version))
        return {"name": model_name, "version": version.version, "new": True, "run_id": self.run_id, "tags": all_tags}

    def _registry_lock(self, model_name: str):

        name = digest(self.uri, model_name, length=16)
        return file_lock(Path(self.cfg.artifacts_dir).resolve() / "locks" / f"registry-{name}.lock")

    @contextmanager
    def registration(self):
        """All-or-nothing registration: if anything fails before the block ends, the versions it
        created are deleted again, so no adapter is left registered without its engines."""
        start = len(self.created_versions)
        try:
            yield
        except BaseException:
            for name, version in reversed(self.created_versions[start:]):
                with suppress(Exception):  # best effort; the original error is what the user must see
                    self.client.delete_model_version(name, version)
            del self.created_versions[start:]
            raise

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        """Point `models:/<name>@<alias>` at `version` (moves the alias if it was elsewhere)."""
        with_retries(lambda: self.client.set_registered_model_alias(model_name, alias, version), f"alias {alias}")

    def find_version(self, model_name: str, key: str):
        try:
            versions = self.client.search_model_versions(f"name = '{model_name}'")
        except Exception:
            return None
        matches = [v for v in versions if v.tags.get(KEY_TAG) == key]
        return min(matches, key=lambda v: int(v.version)) if matches else None


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
