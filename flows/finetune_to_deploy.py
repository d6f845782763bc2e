"""The main flow: config → data → LoRA SFT → merge → engine per target → parity gate → registry.

Only wiring lives here: which stage runs on which inputs, and what is reported. Every stage is a
cached task (tasks/orchestrated.py); every MLflow call goes through ftd.tracking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from ftd import termination
from ftd.config import ExperimentConfig, TargetConfig, load_config
from ftd.errors import GateFailed
from ftd.orchestration import StageLog, StageRecord
from ftd.preflight import preflight
from ftd.run_records import record_run
from ftd.store import Artifact, Store, digest
from ftd.tracking import Tracker
from tasks.adapter_import import check_base_record
from tasks.backends import dashinfer, get_backend, tensorrt_llm
from tasks.multi_lora import union_targets
from tasks.orchestrated import (
    build_task,
    bundle_task,
    dashinfer_lora_task,
    export_adapter_task,
    import_task,
    lora_graph_task,
    merge_task,
    prepare_data_task,
    reference_task,
    resolve_base_task,
    sft_task,
    smoke_task,
    triton_bundle_task,
    trt_engine_task,
    trt_lora_task,
)
from tasks.sft import LOSS_CURVE, adapter_dir


@dataclass
class AdapterOutcome:
    """One adapter's chain up to its PyTorch reference outputs."""

    name: str
    data: Artifact
    adapter: Artifact
    merged: Artifact
    reference: Artifact


@dataclass
class EngineOutcome:
    """One engine checked for one adapter: a merged engine, or a multi-LoRA bundle with that adapter active."""

    target: TargetConfig
    adapter: str
    engine: Artifact
    smoke: Artifact | None = None
    failure: GateFailed | None = None
    smoke_skipped: str | None = None  # the artifact exists (a verified bundle) but cannot be run here

    @property
    def skipped(self) -> bool:
        return bool(self.engine.meta.get("skipped")) or self.smoke_skipped is not None

    @property
    def skip_reason(self) -> str:
        return self.engine.meta.get("reason") or self.smoke_skipped or ""

    @property
    def registrable(self) -> bool:
        """Gate passed, or a bundle that was built and verified but whose engine cannot run here."""
        return self.failure is None and (
            self.smoke is not None or (self.smoke_skipped is not None and not self.engine.meta.get("skipped"))
        )


@flow(name="finetune_to_deploy")
def finetune_to_deploy(
    config_path: str, overrides: list[str] | None = None, parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """Fine-tune every adapter of the experiment and deploy it to every target, gated by parity.

    `parent_run_id` / `run_tags`: the MLflow parent run and extra tags (a sweep's, for its points)."""
    cfg = load_config(config_path, overrides or [])
    plan = preflight(cfg)
    store = Store(cfg.artifacts_dir)
    stages = StageLog()
    logger = get_run_logger()
    with termination.watch(), Tracker(cfg, parent_run_id) as tracker:
        tracker.set_tag("prefect.flow_run_id", flow_run.get_id())
        tracker.set_tag("ftd.config_hash", digest(cfg))
        for tag, value in (run_tags or {}).items():
            tracker.set_tag(tag, value)
        base = stages.run(resolve_base_task, "base", spec=plan.base, store=store)
        for adapter_cfg in cfg.adapters:  # before any training: an imported adapter from another base
            check_base_record(adapter_cfg, base)
        adapters = [_adapter_chain(cfg, adapter_cfg, base, store, stages) for adapter_cfg in cfg.adapters]
        engines: list[EngineOutcome] = []
        for target in cfg.targets:
            if target.backend == tensorrt_llm.NAME:
                engines += _triton_target(target, plan.architecture, base, adapters, store, stages)
            elif target.backend == dashinfer.NAME and target.mode == "multi_lora":
                engines += _dashinfer_lora_target(target, base, adapters, store, stages)
            elif target.mode == "multi_lora":
                engines += _multi_lora_target(cfg, target, base, adapters, store, stages)
            else:
                engines += [_merged_target(cfg, target, a, store, stages) for a in adapters]
        termination.check()  # nothing is registered by a run told to stop
        with tracker.registration():
            registered = _log_and_register(cfg, tracker, store, base, adapters, engines)
        report = _report(cfg, store, tracker, stages, adapters, engines, registered)
        tracker.log_text(report, "report.md")
        create_markdown_artifact(report, key=_artifact_key(cfg.experiment), description="ftd run report")
        logger.info("run report:\n%s", report)
        failures = [e.failure for e in engines if e.failure]
        if failures:
            raise GateFailed("; ".join(str(f) for f in failures))
        summary = {
            "experiment": cfg.experiment,
            "prefect_flow_run_id": str(flow_run.get_id()),
            "prefect_flow_run_name": flow_run.get_name(),
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "stages": [vars(r) for r in stages.records],
            "registered": registered,
            "metrics": _metrics(adapters, engines),
        }
        termination.check()  # a run told to stop is never recorded as passing
        if not any(e.skipped for e in engines):  # what was skipped here must be tried again
            record_run(cfg, tracker.uri, summary)
        return summary


def _adapter_chain(
    cfg: ExperimentConfig, adapter_cfg, base: Artifact, store: Store, stages: StageLog
) -> AdapterOutcome:
    name = adapter_cfg.name
    data = stages.run(prepare_data_task, name, cfg=adapter_cfg.data, store=store)
    if adapter_cfg.import_from is not None:
        adapter = stages.run(import_task, name, base=base, adapter=adapter_cfg, store=store)
    else:
        adapter = stages.run(
            sft_task, name, base=base, data=data, adapter=adapter_cfg, store=store,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    merged = stages.run(merge_task, name, base=base, adapter=adapter, settings=cfg.merge, store=store)
    reference = stages.run(
        reference_task, name, base=base, adapter=adapter, merged=merged, data=data, settings=cfg.smoke, store=store,
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    return AdapterOutcome(name, data, adapter, merged, reference)


def _merged_target(cfg: ExperimentConfig, target: TargetConfig, a: AdapterOutcome, store: Store, stages: StageLog):
    label = f"{a.name}/{target.name}"
    engine = stages.run(build_task, label, merged=a.merged, target=target, store=store)
    backend = get_backend(target.backend)
    no_smoke = backend.smoke_unavailable_reason(target) if hasattr(backend, "smoke_unavailable_reason") else None
    return _gate(cfg, EngineOutcome(target, a.name, engine, smoke_skipped=no_smoke), a, store, stages)


def _multi_lora_target(cfg: ExperimentConfig, target: TargetConfig, base: Artifact, adapters, store, stages):
    """One base graph for all adapters (cached on the module set), one export per adapter."""
    reason = get_backend(target.backend).unavailable_reason(target)
    if reason:
        skipped = Artifact(stage="lora-bundle", key="-", meta={"skipped": True, "reason": reason})
        stages.records.append(StageRecord("lora-bundle", target.name, "skipped", 0.0, "-", reason))
        return [EngineOutcome(target, a.name, skipped) for a in adapters]
    modules = union_targets([a.adapter for a in adapters], store)
    graph = stages.run(lora_graph_task, target.name, base=base, modules=modules, target=target, store=store)
    exports = [
        stages.run(export_adapter_task, f"{a.name}/{target.name}", graph=graph, adapter=a.adapter, store=store)
        for a in adapters
    ]
    bundle = stages.run(bundle_task, target.name, graph=graph, exports=exports, store=store)
    return [_gate(cfg, EngineOutcome(target, a.name, bundle), a, store, stages) for a in adapters]


def _triton_target(target: TargetConfig, architecture: str, base: Artifact, adapters, store, stages):
    """TensorRT-LLM + Triton: adapters converted, engine built where possible, bundle written and verified.

    multi_lora: one bundle over the base model serving every adapter by lora_task_id; merged: one
    bundle per adapter over its merged model. The smoke test needs the engine running on a GPU."""
    if target.mode == "multi_lora":
        loras = [stages.run(trt_lora_task, f"{a.name}/{target.name}", adapter=a.adapter, target=target, store=store)
                 for a in adapters]  # fmt: skip
        plans = [(target.name, base, adapters, loras)]
    else:
        plans = [(f"{a.name}/{target.name}", a.merged, [a], []) for a in adapters]
    outcomes = []
    for label, model, served, loras in plans:
        engine = stages.run(trt_engine_task, label, model=model, loras=loras, target=target,
                            architecture=architecture, store=store)  # fmt: skip
        bundle = stages.run(
            triton_bundle_task, label, model=model, tokenizer_from=served[0].adapter,
            adapters=[a.adapter for a in served if loras], loras=loras, engine=engine, target=target,
            architecture=architecture, store=store,
        )  # fmt: skip
        reason = (f"engine not built ({engine.meta['reason']})" if engine.meta.get("skipped")
                  else "no automated TensorRT-LLM smoke test yet: run request.sh against Triton")  # fmt: skip
        outcomes += [EngineOutcome(target, a.name, bundle, smoke_skipped=reason) for a in served]
    return outcomes


def _dashinfer_lora_target(target: TargetConfig, base: Artifact, adapters, store, stages):
    """DashInfer 2.x multi-LoRA: the bundle is written and checked here; serving it needs a GPU."""
    bundle = stages.run(dashinfer_lora_task, target.name, base=base, adapters=[a.adapter for a in adapters],
                        target=target, store=store)  # fmt: skip
    reason = get_backend(target.backend).unavailable_reason(target)
    return [EngineOutcome(target, a.name, bundle, smoke_skipped=reason) for a in adapters]


def _gate(cfg: ExperimentConfig, outcome: EngineOutcome, a: AdapterOutcome, store: Store, stages: StageLog):
    if outcome.skipped:
        return outcome
    try:
        outcome.smoke = stages.run(
            smoke_task, f"{a.name}/{outcome.target.name}", reference=a.reference, engine=outcome.engine,
            adapter=a.adapter, target=outcome.target, settings=cfg.smoke, store=store,
        )  # fmt: skip
    except GateFailed as failure:
        outcome.failure = failure
    return outcome


def _log_and_register(
    cfg: ExperimentConfig, tracker: Tracker, store: Store, base: Artifact, adapters, engines
) -> list[dict]:
    """Metrics for every stage; registry versions only for artifacts whose gates all passed."""
    registered = []
    lineage = {"ftd.base_key": base.key, "ftd.base_source": base.meta.get("source"), "ftd.experiment": cfg.experiment}
    adapter_versions: dict[str, str] = {}
    for a in adapters:
        sft_meta, ref_meta = a.adapter.meta, a.reference.meta
        if sft_meta.get("loss_curve"):
            tracker.log_curve(f"{a.name}.train_loss", sft_meta["loss_curve"], a.adapter.path(store) / LOSS_CURVE)
        tracker.log_metrics({
            f"{a.name}.train_seconds": sft_meta.get("train_seconds"),
            f"{a.name}.tokens_per_second": sft_meta.get("tokens_per_second"),
            f"{a.name}.eval_accuracy_before": (ref_meta.get("base") or {}).get("accuracy"),
            f"{a.name}.eval_accuracy_after": ref_meta["adapter"]["accuracy"],
        })  # fmt: skip
        mine = [e for e in engines if e.adapter == a.name]
        for e in mine:
            prefix = f"{a.name}.{e.target.name}"
            if e.smoke is not None:
                tracker.log_metrics({f"{prefix}.build_seconds": e.engine.meta.get("build_seconds")})
                tracker.log_metrics({f"{prefix}.{k}": v for k, v in e.smoke.meta["metrics"].items()})
                tracker.log_text((e.smoke.path(store) / "report.md").read_text(), f"smoke/{a.name}/{e.target.name}.md")
            if e.failure:
                tracker.log_text(str(e.failure), f"smoke/{a.name}/{e.target.name}.FAILED.txt")
            if e.skipped:
                tracker.set_tag(f"ftd.skipped.{prefix}", e.skip_reason)
        if any(e.failure for e in mine):
            continue
        version = tracker.register(
            cfg.tracking.adapter_model.format(experiment=cfg.experiment, adapter=a.name, target=""),
            adapter_dir(a.adapter, store),
            f"adapters/{a.name}",
            a.adapter.key,
            {**lineage, "ftd.adapter": a.name, "ftd.data_key": a.data.key,
             "ftd.eval_accuracy": ref_meta["adapter"]["accuracy"]},
        )  # fmt: skip
        adapter_versions[a.name] = f"{version['name']}/{version['version']}"
        registered.append({"kind": "adapter", "item": a.name, **version})
    keys = {a.name: a for a in adapters}
    for target in cfg.targets:
        mine = [e for e in engines if e.target.name == target.name and e.registrable]
        if target.mode == "multi_lora":
            everyone_passed = len(mine) == len(adapters) and all(e.adapter in adapter_versions for e in mine)
            groups = [mine] if mine and everyone_passed else []
        else:
            groups = [[e] for e in mine if e.adapter in adapter_versions]
        for group in groups:
            engine = group[0].engine
            item = target.name if target.mode == "multi_lora" else f"{group[0].adapter}/{target.name}"
            tags = {**lineage, "ftd.mode": target.mode, "ftd.backend": target.backend, "ftd.precision": target.precision,
                    "ftd.adapters": ",".join(e.adapter for e in group),
                    "ftd.adapter_version": ",".join(adapter_versions[e.adapter] for e in group),
                    "ftd.adapter_key": ",".join(keys[e.adapter].adapter.key for e in group),
                    "ftd.data_key": ",".join(keys[e.adapter].data.key for e in group)}  # fmt: skip
            for e in group:
                if e.smoke is None:
                    tags[f"ftd.smoke.{e.adapter}" if len(group) > 1 else "ftd.smoke"] = f"skipped: {e.smoke_skipped}"
                    continue
                tags.update({f"ftd.smoke.{e.adapter}.{k}" if len(group) > 1 else f"ftd.smoke.{k}": v
                             for k, v in e.smoke.meta["metrics"].items()})  # fmt: skip
            if "checks" in engine.meta:
                tags.update({f"ftd.check.{k}": v for k, v in engine.meta["checks"].items()})
                tags["ftd.engine_built"] = engine.meta.get("engine_built")
            version = tracker.register(
                cfg.tracking.engine_model.format(
                    experiment=cfg.experiment, adapter=group[0].adapter, target=target.name
                ),
                engine.path(store),
                f"engines/{item}",
                engine.key,
                tags,
            )
            registered.append({"kind": "engine", "item": item, **version})
    return registered


def _metrics(adapters: list[AdapterOutcome], engines: list[EngineOutcome]) -> dict:
    out: dict = {}
    for a in adapters:
        out[f"{a.name}.eval_accuracy_before"] = (a.reference.meta.get("base") or {}).get("accuracy")
        out[f"{a.name}.eval_accuracy_after"] = a.reference.meta["adapter"]["accuracy"]
    for e in engines:
        prefix = f"{e.adapter}.{e.target.name}"
        if e.smoke is not None:
            out.update({f"{prefix}.{k}": v for k, v in e.smoke.meta["metrics"].items()})
        elif e.skipped:
            out[f"{prefix}.skipped"] = e.skip_reason
    return out


def _report(
    cfg: ExperimentConfig, store: Store, tracker: Tracker, stages: StageLog, adapters, engines, registered
) -> str:
    lines = [f"# ftd run: {cfg.experiment}", "", f"MLflow run `{tracker.run_id}` at `{tracker.uri}`", "",
             "## Stages", "", stages.markdown(), "", "## Results", ""]  # fmt: skip
    for a in adapters:
        before = (a.reference.meta.get("base") or {}).get("accuracy")
        after = a.reference.meta["adapter"]["accuracy"]
        lines.append(f"- **{a.name}**: eval accuracy {_pct(before)} before SFT, {_pct(after)} after")
        for e in (e for e in engines if e.adapter == a.name):
            if e.skipped and "checks" in e.engine.meta:
                checks = ", ".join(f"{k.replace('_', ' ')}: {_short(v)}" for k, v in e.engine.meta["checks"].items())
                lines.append(f"  - {e.target.name}: bundle built and verified on CPU ({checks}); "
                             f"smoke test skipped — {e.skip_reason}")  # fmt: skip
            elif e.skipped:
                lines.append(f"  - {e.target.name}: skipped — {e.skip_reason}")
            elif e.failure:
                lines += [f"  - {e.target.name}: **parity gate failed**", "", str(e.failure), "",
                          _failure_table(e.failure.report), ""]  # fmt: skip
            else:
                lines.append(f"  - {e.target.name}: gate passed")
    lines.append("")
    lines += [_smoke_markdown(e.smoke, store, e.adapter) for e in engines if e.smoke is not None]
    lines += ["## Registered versions", "", "| kind | item | model | version | new |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['item']} | {r['name']} | {r['version']} | {r['new']} |" for r in registered]
    return "\n".join(lines) + "\n"


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


def _artifact_key(name: str) -> str:
    return "ftd-report-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
