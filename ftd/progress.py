"""Progress of long steps, shown where the user is looking: the terminal (log lines) and, inside a
Prefect task run, a Prefect progress artifact on that task run's page.

Stage functions call `Progress(...)` without knowing whether Prefect is running them; outside a
task run (tests, plain scripts) only the log line is written.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ftd.progress")


class Progress:
    def __init__(self, what: str, total: int, every: float = 0.05, counted: bool = True):
        """`counted`: show "done/total" (steps); otherwise only the detail and the percentage."""
        self.what, self.total, self.every, self.counted = what, max(total, 1), every, counted
        self.artifact_id = None
        self.last = -1.0
        self.enabled = _in_task_run()

    def update(self, done: int, detail: str = "") -> None:
        fraction = min(done / self.total, 1.0)
        if fraction < 1.0 and fraction - self.last < self.every:
            return
        self.last = fraction
        count = f"{done}/{self.total}" if self.counted else ""
        text = f"{self.what}: {' '.join(part for part in (count, detail) if part)}"
        if not self.enabled:
            log.info("%s (%.0f%%)", text, 100 * fraction)
            return
        try:
            from prefect import get_run_logger
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            get_run_logger().info("%s (%.0f%%)", text, 100 * fraction)  # terminal and the task run's logs

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(100 * fraction, description=self.what)
            else:
                update_progress_artifact(self.artifact_id, 100 * fraction, description=text)
        except Exception as exc:  # progress must never fail a training run
            log.debug("progress artifact not updated: %s", exc)
            self.enabled = False


def _in_task_run() -> bool:
    try:
        from prefect.context import TaskRunContext
    except ImportError:
        return False
    return TaskRunContext.get() is not None
