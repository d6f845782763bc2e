"""The main flow: config → data → LoRA SFT (or import) → merge → references → each target's backend
deploys → parity gate → registry → report.

Only wiring lives here. Every stage is a cached task (`tasks/orchestrated.py` for the shared ones,
each backend's own package for its stages); backends are reached through the registry by name;
what is registered is decided in `flows/registration.py`, what is shown in `flows/report.py`.
"""

# No `from __future__ import annotations`: `ftd serve` runs this flow from a module Prefect pickles
# by value, where a string annotation (`Plan`) could not be resolved to validate the parameters.
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import registration, report
from flows.preflight import Plan, preflight
from flows.run_records import record_run
from ftd import termination
from ftd.config import ExperimentConfig, load_config
from ftd.errors import GateFailed
from ftd.orchestration import StageLog
from ftd.store import Artifact, Store, digest
from ftd.tracking import Tracker
from tasks.adapter_import import check_base_record
from tasks.backends.base import AdapterChain, DeployContext, Deployment, Status
from tasks.backends.registry import get_backend
from tasks.orchestrated import (
    import_task,
    merge_task,
    prepare_data_task,
    reference_task,
    resolve_base_task,
    sft_task,
    smoke_task,
)


@flow(name="finetune_to_deploy")
def finetune_to_deploy(
    config_path: str, overrides: list[str] | None = None, parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None, plan: Plan | None = None,
) -> dict:  # fmt: skip
    """Fine-tune every adapter of the experiment and deploy it to every target, gated by parity.

    `parent_run_id` / `run_tags`: the MLflow parent run and extra tags (a sweep's, for its points);
    `plan`: the pre-flight result when the caller already ran it (the CLI does)."""
    cfg = load_config(config_path, overrides or [])
    plan = plan or preflight(cfg)
    store = Store(cfg.artifacts_dir)
    stages = StageLog()
    with termination.watch(), Tracker(cfg, parent_run_id) as tracker:
        for tag, value in {"prefect.flow_run_id": flow_run.get_id(), "ftd.config_hash": digest(cfg),
                           **(run_tags or {})}.items():  # fmt: skip
            tracker.set_tag(tag, value)
        base = stages.run(resolve_base_task, "base", spec=plan.base, store=store)
        for adapter_cfg in cfg.adapters:  # before any training: an imported adapter from another base
            check_base_record(adapter_cfg, base)
        chains = [_adapter_chain(cfg, adapter_cfg, base, store, stages) for adapter_cfg in cfg.adapters]
        ctx = DeployContext(cfg, plan.architecture, base, store, stages)
        deployments = [d for target in cfg.targets for d in _deploy(cfg, target, chains, ctx)]
        termination.check()  # nothing is registered by a run told to stop
        with tracker.registration():
            registered = registration.log_and_register(cfg, tracker, store, base, chains, deployments)
        text = report.run_report(cfg, store, tracker.run_id, tracker.uri, stages, chains, deployments, registered)
        tracker.log_text(text, "report.md")
        create_markdown_artifact(text, key=report.artifact_key(cfg.experiment), description="ftd run report")
        get_run_logger().info("run report:\n%s", text)
        failures = [d.failure for d in deployments if d.failure]
        if failures:
            raise GateFailed("; ".join(str(f) for f in failures))
        summary = {"experiment": cfg.experiment, "prefect_flow_run_id": str(flow_run.get_id()),
                   "prefect_flow_run_name": flow_run.get_name(), "mlflow_run_id": tracker.run_id,
                   "tracking_uri": tracker.uri, "stages": [vars(r) for r in stages.records],
                   "registered": registered, "metrics": report.metrics(chains, deployments)}  # fmt: skip
        termination.check()  # a run told to stop is never recorded as passing
        if all(d.complete for d in deployments):  # what could not run here must be tried again
            record_run(cfg, tracker.uri, summary)
        return summary


def _adapter_chain(cfg: ExperimentConfig, adapter_cfg, base: Artifact, store: Store, stages: StageLog) -> AdapterChain:
    name = adapter_cfg.name
    # the base's tokenizer and the adapter's max_length: token statistics, and `data.overlong`
    data = stages.run(prepare_data_task, name, cfg=adapter_cfg.data, store=store, base=base,
                      max_length=adapter_cfg.sft.max_length, trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    if adapter_cfg.import_from is not None:
        adapter = stages.run(import_task, name, base=base, adapter=adapter_cfg, store=store)
    else:
        adapter = stages.run(sft_task, name, base=base, data=data, adapter=adapter_cfg, store=store,
                             trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    merged = stages.run(merge_task, name, base=base, adapter=adapter, settings=cfg.merge, store=store)
    reference = stages.run(reference_task, name, base=base, adapter=adapter, merged=merged, data=data,
                           settings=cfg.smoke, store=store, trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    return AdapterChain(name, data, adapter, merged, reference)


def _deploy(cfg: ExperimentConfig, target, chains: list[AdapterChain], ctx: DeployContext) -> list[Deployment]:
    """One target, through its backend, then the gate. An error inside one target's build or smoke
    fails that target alone, with one line naming it; the other targets still run and register."""
    try:
        deployments = get_backend(target.backend).deploy(ctx, target, chains)
    except Exception as exc:  # a stop request (TerminationSignal) is no Exception: it ends the run
        failure = GateFailed(f"target {target.name} ({target.backend}): build failed: {report.one_line(exc)}")
        return [Deployment(target, c.name, Artifact(stage="engine", key="-"), Status.FAILED, str(failure),
                           failure=failure) for c in chains]  # fmt: skip
    return [_gate(cfg, d, chains, ctx) for d in deployments]


def _gate(cfg: ExperimentConfig, d: Deployment, chains: list[AdapterChain], ctx: DeployContext) -> Deployment:
    """The parity gate on a deployment that is ready for it: the engine against the PyTorch references."""
    if d.status is not Status.READY:
        return d
    chain = next(c for c in chains if c.name == d.adapter)
    try:
        d.smoke = ctx.run(smoke_task, f"{d.adapter}/{d.target.name}", reference=chain.reference, engine=d.engine,
                          adapter=chain.adapter, target=d.target, settings=cfg.smoke)  # fmt: skip
        d.status = Status.PASSED
    except GateFailed as failure:
        d.failure, d.status = failure, Status.FAILED
    except Exception as exc:  # the engine did not run at all: this target's failure, not the run's
        d.failure = GateFailed(
            f"target {d.target.name} ({d.target.backend}): smoke test failed: {report.one_line(exc)}"
        )
        d.status = Status.FAILED
    return d
