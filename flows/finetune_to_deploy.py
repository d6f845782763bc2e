"""The main flow: config → data → LoRA SFT → merge → engine per target → parity gate → registry.

Only wiring lives here: which stage runs on which inputs, and what is reported. Every stage is a
cached task (tasks/orchestrated.py); every MLflow call goes through ftd.tracking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from ftd.config import ExperimentConfig, load_config
from ftd.errors import GateFailed
from ftd.orchestration import StageLog
from ftd.preflight import preflight
from ftd.store import Artifact, Store, digest
from ftd.tracking import Tracker
from tasks.orchestrated import (
    build_task,
    merge_task,
    prepare_data_task,
    reference_task,
    resolve_base_task,
    sft_task,
    smoke_task,
)
from tasks.sft import adapter_dir


@dataclass
class AdapterOutcome:
    name: str
    data: Artifact
    adapter: Artifact
    reference: Artifact
    engines: list[tuple[str, Artifact, Artifact | None]] = field(default_factory=list)  # target, engine, smoke
    failures: list[GateFailed] = field(default_factory=list)


@flow(name="finetune_to_deploy")
def finetune_to_deploy(config_path: str, overrides: list[str] | None = None) -> dict:
    """Fine-tune every adapter of the experiment and deploy it to every target, gated by parity."""
    cfg = load_config(config_path, overrides or [])
    plan = preflight(cfg)
    store = Store(cfg.artifacts_dir)
    stages = StageLog()
    logger = get_run_logger()
    with Tracker(cfg) as tracker:
        tracker.set_tag("prefect.flow_run_id", flow_run.get_id())
        tracker.set_tag("ftd.config_hash", digest(cfg))
        base = stages.run(resolve_base_task, "base", spec=plan.base, store=store)
        outcomes = [_adapter_chain(cfg, adapter_cfg, base, store, stages) for adapter_cfg in cfg.adapters]
        registered = _log_and_register(cfg, tracker, store, base, outcomes)
        report = _report(cfg, tracker, stages, outcomes, registered)
        tracker.log_text(report, "report.md")
        create_markdown_artifact(report, key=_artifact_key(cfg.experiment), description="ftd run report")
        logger.info("run report:\n%s", report)
        failures = [f for o in outcomes for f in o.failures]
        if failures:
            raise GateFailed("; ".join(str(f) for f in failures))
        return {
            "experiment": cfg.experiment,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "stages": [vars(r) for r in stages.records],
            "registered": registered,
            "metrics": _metrics(outcomes),
        }


def _adapter_chain(
    cfg: ExperimentConfig, adapter_cfg, base: Artifact, store: Store, stages: StageLog
) -> AdapterOutcome:
    name = adapter_cfg.name
    data = stages.run(prepare_data_task, name, cfg=adapter_cfg.data, store=store)
    adapter = stages.run(
        sft_task, name, base=base, data=data, adapter=adapter_cfg, store=store, trust_remote_code=cfg.trust_remote_code
    )
    merged = stages.run(merge_task, name, base=base, adapter=adapter, settings=cfg.merge, store=store)
    reference = stages.run(
        reference_task, name, base=base, adapter=adapter, merged=merged, data=data, settings=cfg.smoke, store=store,
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    outcome = AdapterOutcome(name, data, adapter, reference)
    for target in cfg.targets:
        label = f"{name}/{target.name}"
        engine = stages.run(build_task, label, merged=merged, target=target, store=store)
        if engine.meta.get("skipped"):
            outcome.engines.append((target.name, engine, None))
            continue
        try:
            smoke = stages.run(
                smoke_task, label, reference=reference, engine=engine, adapter=adapter, target=target,
                settings=cfg.smoke, store=store,
            )  # fmt: skip
        except GateFailed as failure:
            outcome.failures.append(failure)
            outcome.engines.append((target.name, engine, None))
            continue
        outcome.engines.append((target.name, engine, smoke))
    return outcome


def _log_and_register(cfg: ExperimentConfig, tracker: Tracker, store: Store, base: Artifact, outcomes) -> list[dict]:
    """Metrics for every stage; registry versions only for artifacts whose gates all passed."""
    registered = []
    lineage = {"ftd.base_key": base.key, "ftd.base_source": base.meta.get("source"), "ftd.experiment": cfg.experiment}
    for o in outcomes:
        sft_meta, ref_meta = o.adapter.meta, o.reference.meta
        tracker.log_curve(f"{o.name}.train_loss", sft_meta["loss_curve"])
        tracker.log_metrics({
            f"{o.name}.train_seconds": sft_meta.get("train_seconds"),
            f"{o.name}.tokens_per_second": sft_meta.get("tokens_per_second"),
            f"{o.name}.eval_accuracy_before": (ref_meta.get("base") or {}).get("accuracy"),
            f"{o.name}.eval_accuracy_after": ref_meta["adapter"]["accuracy"],
        })  # fmt: skip
        for target, engine, smoke in o.engines:
            if smoke is not None:
                tracker.log_metrics({f"{o.name}.{target}.build_seconds": engine.meta.get("build_seconds")})
                tracker.log_metrics({f"{o.name}.{target}.{k}": v for k, v in smoke.meta["metrics"].items()})
                tracker.log_text((smoke.path(store) / "report.md").read_text(), f"smoke/{o.name}/{target}.md")
        for failure in o.failures:
            tracker.log_text(str(failure), f"smoke/{o.name}/FAILED.txt")
        if o.failures:
            continue
        adapter_version = tracker.register(
            cfg.tracking.adapter_model.format(experiment=cfg.experiment, adapter=o.name, target=""),
            adapter_dir(o.adapter, store),
            f"adapters/{o.name}",
            o.adapter.key,
            {**lineage, "ftd.adapter": o.name, "ftd.data_key": o.data.key,
             "ftd.eval_accuracy": ref_meta["adapter"]["accuracy"]},
        )  # fmt: skip
        registered.append({"kind": "adapter", "item": o.name, **adapter_version})
        for target, engine, smoke in o.engines:
            if smoke is None:
                continue
            version = tracker.register(
                cfg.tracking.engine_model.format(experiment=cfg.experiment, adapter=o.name, target=target),
                engine.path(store),
                f"engines/{o.name}/{target}",
                engine.key,
                {**lineage, "ftd.adapter": o.name, "ftd.data_key": o.data.key, "ftd.adapter_key": o.adapter.key,
                 "ftd.adapter_version": f"{adapter_version['name']}/{adapter_version['version']}",
                 "ftd.backend": engine.meta.get("backend"), "ftd.precision": engine.meta.get("precision"),
                 **{f"ftd.smoke.{k}": v for k, v in smoke.meta["metrics"].items()}},
            )  # fmt: skip
            registered.append({"kind": "engine", "item": f"{o.name}/{target}", **version})
    return registered


def _metrics(outcomes: list[AdapterOutcome]) -> dict:
    out = {}
    for o in outcomes:
        out[f"{o.name}.eval_accuracy_before"] = (o.reference.meta.get("base") or {}).get("accuracy")
        out[f"{o.name}.eval_accuracy_after"] = o.reference.meta["adapter"]["accuracy"]
        for target, engine, smoke in o.engines:
            if smoke is not None:
                out.update({f"{o.name}.{target}.{k}": v for k, v in smoke.meta["metrics"].items()})
            elif engine.meta.get("skipped"):
                out[f"{o.name}.{target}.skipped"] = engine.meta["reason"]
    return out


def _report(cfg: ExperimentConfig, tracker: Tracker, stages: StageLog, outcomes, registered: list[dict]) -> str:
    lines = [f"# ftd run: {cfg.experiment}", "", f"MLflow run `{tracker.run_id}` at `{tracker.uri}`", "",
             "## Stages", "", stages.markdown(), ""]  # fmt: skip
    lines += ["## Results", ""]
    for o in outcomes:
        before = (o.reference.meta.get("base") or {}).get("accuracy")
        after = o.reference.meta["adapter"]["accuracy"]
        lines.append(f"- **{o.name}**: eval accuracy {_pct(before)} before SFT, {_pct(after)} after")
        for target, engine, smoke in o.engines:
            if engine.meta.get("skipped"):
                lines.append(f"  - {target}: skipped — {engine.meta['reason']}")
            elif smoke is None:
                lines.append(f"  - {target}: **parity gate failed**")
        for failure in o.failures:
            lines += ["", str(failure), "", _failure_table(failure.report)]
    lines += [""]
    for o in outcomes:
        for _target, _engine, smoke in o.engines:
            if smoke is not None:
                lines.append(_smoke_markdown(smoke, cfg, o.name))
    lines += ["## Registered versions", "", "| kind | item | model | version | new |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['item']} | {r['name']} | {r['version']} | {r['new']} |" for r in registered]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _smoke_markdown(smoke: Artifact, cfg: ExperimentConfig, adapter: str) -> str:
    store = Store(cfg.artifacts_dir)
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _artifact_key(name: str) -> str:
    return "ftd-report-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
