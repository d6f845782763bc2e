"""The run report (Markdown: a Prefect artifact and `report.md` on the MLflow run), the run's
summary metrics, and a sweep's comparison: the one owner of how outcomes are shown."""

from __future__ import annotations

import re

from ftd.config import ExperimentConfig
from ftd.orchestration import StageLog
from ftd.store import Artifact, Store
from tasks.backends.base import AdapterChain, Deployment, Status


def data_metrics(chains: list[AdapterChain]) -> dict:
    """Each adapter's train tokens and rows over max_length (MLflow metrics, in the run summary)."""
    out: dict = {}
    for a in chains:
        stats = a.data.meta.get("tokens")
        if stats:  # absent: a data artifact made without the base's tokenizer
            out[f"{a.name}.data.train_tokens"] = stats["train"]["tokens"]
            out[f"{a.name}.data.over_max_length"] = stats["train"]["over_max_length"]
    return out


def metrics(chains: list[AdapterChain], deployments: list[Deployment]) -> dict:
    out: dict = data_metrics(chains)
    for a in chains:
        out[f"{a.name}.eval_accuracy_before"] = (a.reference.meta.get("base") or {}).get("accuracy")
        out[f"{a.name}.eval_accuracy_after"] = a.reference.meta["adapter"]["accuracy"]
    for d in deployments:
        prefix = f"{d.adapter}.{d.target.name}"
        if d.smoke is not None:
            out.update({f"{prefix}.{k}": v for k, v in d.smoke.meta["metrics"].items()})
        elif d.status in (Status.SKIPPED, Status.VERIFIED_ONLY):
            out[f"{prefix}.skipped"] = d.reason
    return out


def run_report(
    cfg: ExperimentConfig, store: Store, run_id: str, tracking_uri: str, stages: StageLog, chains: list[AdapterChain],
    deployments: list[Deployment], registered: list[dict],
) -> str:  # fmt: skip
    lines = [f"# ftd run: {cfg.experiment}", "", f"MLflow run `{run_id}` at `{tracking_uri}`", "",
             "## Stages", "", stages.markdown(), "", "## Results", ""]  # fmt: skip
    for a in chains:
        before = (a.reference.meta.get("base") or {}).get("accuracy")
        after = a.reference.meta["adapter"]["accuracy"]
        lines.append(f"- **{a.name}**: eval accuracy {_pct(before)} before SFT, {_pct(after)} after")
        lines += [f"  - {line}" for line in [data_line(a.data.meta)] if line]
        lines += [_outcome_line(d) for d in deployments if d.adapter == a.name]
    lines.append("")
    lines += [_smoke_markdown(d.smoke, store, d.adapter) for d in deployments if d.smoke is not None]
    lines += [
        "## Registered versions",
        "",
        "| kind | item | model | version | new | served |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['kind']} | {r['item']} | {r['name']} | {r['version']} | {r['new']} | {r.get('served', '-')} |"
              for r in registered]  # fmt: skip
    return "\n".join(lines) + "\n"


OVERLONG = {"warn": "truncated by training", "truncate": "truncated by training", "drop": "dropped"}


def data_line(meta: dict) -> str | None:
    """The data stage's token statistics in one line, e.g. `data: 1936 train rows, 58,123 tokens
    (max 41), 0 over max_length 64`; what became of rows over max_length, and eval rows over it."""
    stats = meta.get("tokens")
    if not stats:
        return None
    train, evals, limit = stats["train"], stats.get("eval") or {}, stats["max_length"]
    line = (f"data: {train['rows']} train rows, {train['tokens']:,} tokens (max {train['max_tokens']}), "
            f"{train['over_max_length']} over max_length {limit}")  # fmt: skip
    if train["over_max_length"]:
        line += f": {OVERLONG[stats['overlong']]} (data.overlong: {stats['overlong']})"
    if stats["dropped"]:
        line += f", {train['rows'] - stats['dropped']} train rows left"
    if evals.get("over_max_length"):
        line += f"; eval: {evals['over_max_length']} of {evals['rows']} rows over max_length {limit} (kept)"
    return line


def _outcome_line(d: Deployment) -> str:
    if d.status is Status.VERIFIED_ONLY and "checks" in d.engine.meta:
        checks = ", ".join(f"{k.replace('_', ' ')}: {_short(v)}" for k, v in d.engine.meta["checks"].items())
        return f"  - {d.target.name}: bundle built and verified on CPU ({checks}); smoke test skipped — {d.reason}"
    if d.status in (Status.SKIPPED, Status.VERIFIED_ONLY):
        return f"  - {d.target.name}: skipped — {d.reason}"
    if d.status is Status.FAILED:
        table = _failure_table(d.failure.report) if d.failure else ""
        return "\n".join([f"  - {d.target.name}: **parity gate failed**", "", str(d.failure), "", table, ""])
    return f"  - {d.target.name}: gate passed"


def one_line(exc: Exception) -> str:
    """An error as one line for the report and the terminal: its type and its last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def _smoke_markdown(smoke: Artifact, store: Store, adapter: str) -> str:
    text = (smoke.path(store) / "report.md").read_text()
    return text.replace("## Smoke test: ", f"### Smoke test: {adapter} → ", 1)


def _failure_table(report: dict) -> str:
    if not report:
        return ""
    rows = ["| prompt | expected | adapter | merged | engine |", "|---|---|---|---|---|"]
    differing = {d["prompt"] for p in report.get("pairs", {}).values() for d in p["differing"]}
    for i in sorted(differing)[:20]:
        r = report["rows"][i]
        rows.append(
            f"| {r['prompt'][:60]} | {r['expected']} | {r.get('adapter')} | {r.get('merged')} | {r.get('engine')} |"
        )
    return "\n".join(rows)


def _short(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def artifact_key(name: str) -> str:
    """The Prefect artifact key of an experiment's report (one per experiment, versioned by Prefect)."""
    return "ftd-report-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------- sweeps


def sweep_row(spec, r: dict, champion: dict | None) -> dict:
    """One point of a sweep as a row of its comparison table."""
    summary = r["summary"] or {}
    return {
        "point": r["point"],
        "overrides": ", ".join(r["overrides"]) or "(base)",
        spec.objective.metric: r["objective"],
        "gates": "passed" if r["passed"] else f"failed: {(r['error'] or '')[:200]}",
        "champion": bool(champion and champion["point"] == r["point"]),
        "mlflow_run": summary.get("mlflow_run_id", ""),
        "registered": ", ".join(f"{v['name']} v{v['version']}" for v in summary.get("registered", [])),
        "cache_hits": len(r["reused"]),
    }


def sweep_report(spec, rows: list[dict], champion: dict | None) -> str:
    """The sweep's comparison (Markdown): one row per point, the champion and what was promoted."""
    metric = spec.objective.metric
    lines = [f"# Sweep {spec.name}", "", f"Objective: {spec.objective.mode} `{metric}`.", "",
             f"| point | overrides | {metric} | gates | cache hits | registered |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        value = "n/a" if row[metric] is None else f"{row[metric]:.4g}"
        star = " **champion**" if row["champion"] else ""
        lines.append(f"| {row['point']}{star} | {row['overrides']} | {value} | {row['gates']} | {row['cache_hits']} | "
                     f"{row['registered']} |")  # fmt: skip
    lines.append("")
    if champion:
        lines.append(f"Promoted point {champion['point']}: " + "; ".join(champion["aliases"]))
    else:
        lines.append("No version promoted: no point passed its gates." if spec.promote else "Promotion disabled.")
    return "\n".join(lines) + "\n"
