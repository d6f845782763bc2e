"""The sweep flow: one `finetune_to_deploy` subflow per point, one MLflow parent run, a comparison
table, and promotion of the best passing point's versions to an alias.

All points share the base config's artifact store, so whatever they have in common (the base
model, data preparation, often SFT itself) is built once and is a cache hit for the others.
"""

from __future__ import annotations

import contextvars
import re
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import report
from flows.finetune_to_deploy import finetune_to_deploy
from ftd import termination
from ftd.config import load_config
from ftd.sweep import load_sweep
from ftd.tracking import Tracker, with_retries


@flow(name="ftd_sweep")
def sweep(sweep_path: str) -> dict:
    """Run every point of the sweep, compare them, promote the best one that passed its gates."""
    spec, runs, _configs = load_sweep(sweep_path)
    logger = get_run_logger()
    base_cfg = load_config(spec.base, spec.overrides)
    # The points run in worker threads, where no signal handler runs: the sweep's watch records a
    # SIGTERM and each point's own checks (every stage, every SFT step) see it and stop.
    with termination.watch(), Tracker(base_cfg, run_name=f"sweep-{spec.name}") as parent:
        parent.set_tag("ftd.sweep", spec.name)

        def run_point(index: int) -> dict:
            overrides = runs[index]
            tags = {"ftd.sweep": spec.name, "ftd.sweep_point": str(index)}
            state = finetune_to_deploy(
                config_path=str(spec.base), overrides=overrides, parent_run_id=parent.run_id, run_tags=tags,
                return_state=True,
            )  # fmt: skip
            own = overrides[len(spec.overrides) :]
            if state.is_completed():
                return {"point": index, "overrides": own, "passed": True, "error": None, "summary": state.result()}
            # A failed gate still logged its metrics: read them from the point's MLflow run.
            child = _child_run(parent, index)
            summary = {"mlflow_run_id": child.info.run_id, "metrics": child.data.metrics} if child else None
            return {"point": index, "overrides": own, "passed": False, "error": state.message, "summary": summary}

        # Each point runs in a copy of this flow's context, so Prefect records it as a subflow of
        # the sweep (a bare worker thread would start unrelated top-level flow runs).
        with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
            futures = [pool.submit(contextvars.copy_context().run, run_point, i) for i in range(len(runs))]
            results = [f.result() for f in futures]
        for r in results:
            summary = r["summary"] or {}
            r["objective"] = (summary.get("metrics") or {}).get(spec.objective.metric)
            if r["passed"] and r["objective"] is None:
                r["passed"], r["error"] = False, f"objective metric {spec.objective.metric!r} not in the run's metrics"
            r["reused"] = [
                f"{s['stage']}[{s['label']}]" for s in summary.get("stages", []) if s["status"] == "cache hit"
            ]
            logger.info("point %d %s: %s", r["point"], r["overrides"], "passed" if r["passed"] else r["error"])
        champion = _promote(spec, parent, results)
        rows = [report.sweep_row(spec, r, champion) for r in results]
        markdown = report.sweep_report(spec, rows, champion)
        key = "ftd-sweep-" + re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")
        create_table_artifact(rows, key=key, description=f"sweep {spec.name}: one row per point")
        create_markdown_artifact(markdown, key=key + "-report", description=f"sweep {spec.name} report")
        parent.log_text(markdown, "comparison.md")
        columns = {k: [row[k] for row in rows] for k in rows[0]}
        with_retries(lambda: parent.client.log_table(parent.run_id, data=columns, artifact_file="comparison.json"),
                     "log comparison table")  # fmt: skip
        parent.log_metrics({f"point_{r['point']}.{spec.objective.metric}": r["objective"] for r in results})
        logger.info("sweep report:\n%s", markdown)
        return {"sweep": spec.name, "mlflow_parent_run_id": parent.run_id, "tracking_uri": parent.uri,
                "champion": champion, "points": rows}  # fmt: skip


def _child_run(parent: Tracker, index: int):
    experiment = parent.client.get_experiment_by_name(parent.experiment_name)
    runs = parent.client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.`ftd.sweep_point` = '{index}'",
    )
    return runs[0] if runs else None


def _promote(spec, parent: Tracker, results: list[dict]) -> dict | None:
    """Alias the best passing point's registered versions; never a point whose gates failed."""
    candidates = [r for r in results if r["passed"]]
    if not candidates or spec.promote is None:
        parent.set_tag("ftd.champion", "none: no point passed its gates" if not candidates else "promotion disabled")
        return None
    pick = max if spec.objective.mode == "max" else min
    best = pick(candidates, key=lambda r: r["objective"])
    aliased = []
    for version in best["summary"]["registered"]:
        parent.set_alias(version["name"], spec.promote.alias, version["version"])
        aliased.append(f"{version['name']}@{spec.promote.alias} = v{version['version']}")
    parent.set_tag("ftd.champion", f"point {best['point']}: {', '.join(best['overrides'])}")
    return {"point": best["point"], "objective": best["objective"], "aliases": aliased}
