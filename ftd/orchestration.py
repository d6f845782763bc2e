"""Thin Prefect wrappers: caching, naming and logging around the pure stage functions.

The Prefect cache key *is* the stage's artifact key, so Prefect's "Cached" state and the store
agree. If the artifact was deleted from the store, the stale Prefect record is dropped first, so
the task runs again instead of returning a path that no longer exists.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftd import termination
from ftd.memory import PeakMemory, release_freed_memory
from ftd.store import Artifact, Store


class StageTask:
    """A pure stage function declared as a cached Prefect task, once.

    `key` is the stage's own key function (the one the stage itself stores its artifact under):
    it is called with the task's arguments of the same names, so the Prefect cache key and the
    store key are one computation, and a key parameter the stage does not take is an error when
    the task is declared (they cannot drift apart). It returns None when the result must not be
    cached; `skip_reason` (same binding) returning a reason also means "not cached": a step that is
    skipped on this machine must run where it can. The Prefect task itself is made on first use:
    backends declare their stages when they are imported, and pre-flight imports every backend a
    config names; importing Prefect there would add ~1.5 s to `ftd validate` and the up-to-date check."""

    def __init__(self, fn: Callable[..., Artifact], stage: str, key: Callable[..., str | None], run_name: str,
                 skip_reason: Callable[..., str | None] | None = None):  # fmt: skip
        taken = set(inspect.signature(fn).parameters)
        for part in (key, skip_reason):
            unknown = set(inspect.signature(part).parameters) - taken if part else set()
            if unknown:
                raise TypeError(f"stage {stage}: {part.__name__} takes {sorted(unknown)}, which {fn.__name__} does not")
        self.fn, self.stage, self.key, self.run_name, self.skip_reason = fn, stage, key, run_name, skip_reason
        self._task = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Picklable (Prefect's runner cloudpickles a served flow with the tasks it references):
        the lock and the Prefect task, made on first use, are left behind."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_task", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _task=None, _lock=threading.Lock())

    def key_of(self, parameters: dict) -> str | None:
        """The artifact key for these task arguments, or None: not cached."""
        if self.skip_reason is not None and self.skip_reason(**_bound(self.skip_reason, parameters)):
            return None
        return self.key(**_bound(self.key, parameters))

    @property
    def prefect(self):
        with self._lock:
            if self._task is None:
                self._task = self._make_task()
            return self._task

    def __call__(self, **kwargs: Any):
        """Run as the Prefect task (`return_state=True` is passed through)."""
        return self.prefect(**kwargs)

    def _make_task(self):
        from prefect import task
        from prefect.states import Completed

        stage, fn = self.stage, self.fn

        def cache_key(context, parameters: dict) -> str | None:
            key = self.key_of(parameters)
            if key is None:
                return None
            store: Store = parameters["store"]
            record = f"{stage}-{key}"
            if not store.has(stage, key):
                (results_dir() / record).unlink(missing_ok=True)
            return record

        @functools.wraps(fn)
        def run(*args, **kwargs):
            artifact = fn(*args, **kwargs)
            if artifact.meta.get("skipped"):  # shown as "Skipped" with the reason in the Prefect UI
                return Completed(name="Skipped", message=artifact.meta.get("reason", ""), data=artifact)
            return artifact

        return task(
            run, name=stage, cache_key_fn=cache_key, persist_result=True, result_serializer="json",
            task_run_name=self.run_name,
        )  # fmt: skip


def _bound(fn: Callable, parameters: dict) -> dict:
    """The arguments `fn` takes, by name, from a task's parameters (a missing one is a TypeError)."""
    return {name: parameters[name] for name in inspect.signature(fn).parameters if name in parameters}


def stage_task(fn: Callable[..., Artifact], stage: str, key: Callable[..., str | None], run_name: str,
               skip_reason: Callable[..., str | None] | None = None) -> StageTask:  # fmt: skip
    return StageTask(fn, stage, key, run_name, skip_reason)


def results_dir() -> Path:
    """Where Prefect persists task results (ftd.environment points it into the artifacts folder)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


@dataclass
class StageRecord:
    stage: str
    label: str
    status: str  # "built" | "cache hit" | "skipped"
    seconds: float
    key: str
    detail: str = ""
    peak_rss_mb: float | None = None  # this stage's peak resident memory (ftd.memory), when it ran


@dataclass
class StageLog:
    """What the run report shows: each stage with cache hit/miss and duration."""

    records: list[StageRecord] = field(default_factory=list)

    def run(self, prefect_task: StageTask, label: str, **kwargs: Any) -> Artifact:
        termination.check()  # between stages: a stop request is honoured before the next one starts
        started = time.perf_counter()
        with PeakMemory() as peak:
            state = prefect_task(return_state=True, **kwargs)
        release_freed_memory()
        artifact: Artifact = state.result()  # re-raises the task's exception on failure
        termination.check()
        seconds = time.perf_counter() - started
        if artifact.meta.get("skipped"):
            status, detail = "skipped", artifact.meta.get("reason", "")
        elif state.name == "Cached" or artifact.cached:
            status, detail = "cache hit", ""
        else:
            status, detail = "built", ""
        peak_mb = round(peak.bytes / 1e6, 1) if peak.bytes is not None and status == "built" else None
        self.records.append(StageRecord(artifact.stage, label, status, round(seconds, 2), artifact.key, detail, peak_mb))
        return artifact

    def skip(self, stage: str, label: str, reason: str) -> None:
        """A stage that cannot run here: recorded as skipped (no task runs, nothing is cached)."""
        self.records.append(StageRecord(stage, label, "skipped", 0.0, "-", reason))

    def markdown(self) -> str:
        lines = ["| stage | item | status | seconds | peak RSS | key |", "|---|---|---|---|---|---|"]
        for r in self.records:
            status = f"{r.status}: {r.detail}" if r.detail else r.status
            peak = "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb / 1000:.2f} GB"
            lines.append(f"| {r.stage} | {r.label} | {status} | {r.seconds:.2f} | {peak} | `{r.key[:12]}` |")
        return "\n".join(lines)
