"""What a run registers, and under which tags: the one owner of the registration rules and of the
`ftd.*` tag schema. Every MLflow call goes through `ftd.tracking.Tracker`.

Rules:
- An adapter is registered unless a gate failed on the adapter itself (its eval accuracy, or its
  merge against the unmerged adapter). An engine that failed to build, to run or to match fails
  alone: the adapter and its other engines are still registered.
- A merged engine is registered when its deployment passed (or is verified only: a bundle written
  and checked here whose engine cannot run here) and its adapter was registered.
- A bundle serving several adapters is all or nothing: registered once, only when every adapter's
  deployment is registrable and every adapter was registered.
- A version whose every deployment passed its gate here is an MLflow chat Model
  (`tasks/serving`: loadable with `mlflow.pyfunc.load_model`, servable with `mlflow models serve`,
  `ftd chat`); one only verified here is its plain folder (tag `ftd.servable` says which). An
  adapter version is a chat Model too: its own files, its base referenced and checked at load.
"""

from __future__ import annotations

import json

from flows.report import data_metrics
from ftd.config import ExperimentConfig, TargetConfig
from ftd.store import Artifact, Store
from ftd.tracking import Tracker
from tasks.backends.base import AdapterChain, Deployment, Status
from tasks.backends.registry import get_backend
from tasks.base_model import files_digest, model_dir
from tasks.serving.package import ServedAdapter, write_adapter_model, write_chat_model
from tasks.serving.served import ServedCase, check_served
from tasks.sft import LOSS_CURVE, adapter_dir


def lineage_tags(cfg: ExperimentConfig, base: Artifact) -> dict:
    return {"ftd.base_key": base.key, "ftd.base_source": base.meta.get("source"), "ftd.experiment": cfg.experiment}


def adapter_tags(cfg: ExperimentConfig, base: Artifact, chain: AdapterChain) -> dict:
    return {**lineage_tags(cfg, base), "ftd.adapter": chain.name, "ftd.data_key": chain.data.key,
            "ftd.eval_accuracy": chain.reference.meta["adapter"]["accuracy"]}  # fmt: skip


def engine_tags(
    cfg: ExperimentConfig, base: Artifact, target: TargetConfig, group: list[Deployment],
    chains: dict[str, AdapterChain], adapter_versions: dict[str, str],
) -> dict:  # fmt: skip
    """Lineage, each adapter's registered version and keys, and each adapter's gate metrics (or why
    it was not gated); a bundle's CPU checks."""
    tags = {**lineage_tags(cfg, base), "ftd.mode": target.mode, "ftd.backend": target.backend,
            "ftd.precision": target.precision, "ftd.adapters": ",".join(d.adapter for d in group),
            "ftd.adapter_version": ",".join(adapter_versions[d.adapter] for d in group),
            "ftd.adapter_key": ",".join(chains[d.adapter].adapter.key for d in group),
            "ftd.data_key": ",".join(chains[d.adapter].data.key for d in group)}  # fmt: skip
    for d in group:
        prefix = f"ftd.smoke.{d.adapter}" if len(group) > 1 else "ftd.smoke"
        if d.smoke is None:
            tags[prefix] = f"skipped: {d.reason}"
        else:
            tags.update({f"{prefix}.{k}": v for k, v in d.smoke.meta["metrics"].items()})
    engine = group[0].engine
    if "checks" in engine.meta:
        tags.update({f"ftd.check.{k}": v for k, v in engine.meta["checks"].items()})
        tags["ftd.engine_built"] = engine.meta.get("engine_built")
    return tags


def registrable_groups(target: TargetConfig, deployments: list[Deployment], adapters: list[str],
                       registered_adapters: set[str]) -> list[list[Deployment]]:  # fmt: skip
    """The versions to register for one target: one group per merged engine, or the bundle as one
    group (all or nothing)."""
    mine = [d for d in deployments if d.target.name == target.name and d.registrable]
    if target.mode == "multi_lora":
        everyone = len(mine) == len(adapters) and all(d.adapter in registered_adapters for d in mine)
        return [mine] if mine and everyone else []
    return [[d] for d in mine if d.adapter in registered_adapters]


def log_and_register(
    cfg: ExperimentConfig, tracker: Tracker, store: Store, base: Artifact, chains: list[AdapterChain],
    deployments: list[Deployment],
) -> list[dict]:  # fmt: skip
    """Metrics for every stage; registry versions only for what the rules above allow."""
    registered: list[dict] = []
    adapter_versions: dict[str, str] = {}
    for chain in chains:
        _log_adapter(tracker, store, chain, [d for d in deployments if d.adapter == chain.name])
        if any(d.adapter_failed for d in deployments if d.adapter == chain.name):
            continue
        name = cfg.tracking.adapter_model.format(experiment=cfg.experiment, adapter=chain.name, target="")
        version = tracker.register(name, adapter_dir(chain.adapter, store), f"adapters/{chain.name}", chain.adapter.key,
                                   {**adapter_tags(cfg, base, chain), "ftd.servable": "chat"},
                                   write=served_check(cfg, tracker, adapter_model_writer(cfg, base, chain, store, name),
                                                      adapter_cases(chain, store), bundle=False))  # fmt: skip
        adapter_versions[chain.name] = f"{version['name']}/{version['version']}"
        registered.append(_entry("adapter", chain.name, version))
    by_name = {c.name: c for c in chains}
    for target in cfg.targets:
        for group in registrable_groups(target, deployments, list(by_name), set(adapter_versions)):
            item = target.name if target.mode == "multi_lora" else f"{group[0].adapter}/{target.name}"
            name = cfg.tracking.engine_model.format(experiment=cfg.experiment, adapter=group[0].adapter,
                                                    target=target.name)  # fmt: skip
            engine = group[0].engine
            tags = engine_tags(cfg, base, target, group, by_name, adapter_versions)
            write = served_check(cfg, tracker, chat_model_writer(target, group, by_name, store, name),
                                 served_cases(group, by_name, store), bundle=target.mode == "multi_lora")  # fmt: skip
            tags["ftd.servable"] = "chat" if write else f"no: {group[0].reason}"
            version = tracker.register(name, engine.path(store), f"engines/{item}", engine.key, tags, write=write)
            registered.append(_entry("engine", item, version))
    return registered


def chat_model_writer(target: TargetConfig, group: list[Deployment], chains: dict[str, AdapterChain], store: Store,
                      model_name: str):  # fmt: skip
    """How to write the version as an MLflow chat Model: for engines that passed their gate here
    (their runtime ran); a bundle only verified here is registered as its plain folder."""
    if not all(d.status is Status.PASSED for d in group):
        return None
    engine = group[0].engine
    served = [ServedAdapter(d.adapter, adapter_dir(chains[d.adapter].adapter, store),
                            reference_eos(chains[d.adapter].reference, store)) for d in group]  # fmt: skip
    merged_dir = chains[group[0].adapter].merged.path(store)
    backend = get_backend(target.backend)
    engine_context = backend.context_length(engine.path(store), target)
    return lambda out: write_chat_model(out, engine.path(store), target, served, merged_dir, model_name,
                                        backend.libraries, engine_context)  # fmt: skip


def adapter_model_writer(cfg: ExperimentConfig, base: Artifact, chain: AdapterChain, store: Store, model_name: str):
    """The adapter as an MLflow chat Model over its base, referenced by source and files' digest."""
    folder = adapter_dir(chain.adapter, store)
    served = ServedAdapter(chain.name, folder, reference_eos(chain.reference, store))
    # an external base's digest was taken when it was resolved (memoised); a builtin's is quick
    digest = base.meta.get("content_digest") or files_digest(model_dir(base))
    reference = {"source": base.meta["source"], "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
                 "files_digest": digest}  # fmt: skip
    return lambda out: write_adapter_model(out, served, folder, reference, model_dir(base), model_name)


def _entry(kind: str, item: str, version: dict) -> dict:
    """A registered version as the run summary and report list it (with its served-gate result)."""
    tags = version.pop("tags", {})
    return {"kind": kind, "item": item, **version, "served": tags.get("ftd.served", "-")}


def served_check(cfg: ExperimentConfig, tracker: Tracker, write, cases: list[ServedCase], bundle: bool):
    """With `smoke.served`, the written model is also served and asked every gate prompt over HTTP
    before it is registered (tasks/serving/served.py); its result becomes the tag `ftd.served`."""
    if write is None or not cfg.smoke.served:
        return write

    def write_and_serve(out):
        write(out)
        log_dir = cfg.artifacts_dir / "logs"
        return check_served(out, cases, cfg.smoke.max_new_tokens, bundle, tracker.uri, log_dir)

    return write_and_serve


def served_cases(group: list[Deployment], chains: dict[str, AdapterChain], store: Store) -> list[ServedCase]:
    """Each adapter's gate prompts and the engine's tokens for them (recorded by the smoke stage)."""
    cases = []
    for d in group:
        if d.smoke is None:
            continue
        prompts = json.loads((chains[d.adapter].reference.path(store) / "prompts.json").read_text())["prompts"]
        tokens = json.loads((d.smoke.path(store) / "engine_tokens.json").read_text())
        cases += [ServedCase(d.adapter, p["messages"], t) for p, t in zip(prompts, tokens)]
    return cases


def adapter_cases(chain: AdapterChain, store: Store) -> list[ServedCase]:
    ref = chain.reference.path(store)
    prompts = json.loads((ref / "prompts.json").read_text())["prompts"]
    tokens = json.loads((ref / "tokens.json").read_text())["adapter"]
    return [ServedCase(chain.name, p["messages"], t) for p, t in zip(prompts, tokens)]


def reference_eos(reference: Artifact, store: Store) -> list[int]:
    """The stop tokens the gate decoded with (the reference stage recorded them)."""
    return json.loads((reference.path(store) / "prompts.json").read_text())["eos"]


def _log_adapter(tracker: Tracker, store: Store, chain: AdapterChain, mine: list[Deployment]) -> None:
    sft_meta, ref_meta = chain.adapter.meta, chain.reference.meta
    if sft_meta.get("loss_curve"):
        tracker.log_curve(f"{chain.name}.train_loss", sft_meta["loss_curve"], chain.adapter.path(store) / LOSS_CURVE)
    tracker.log_metrics({
        f"{chain.name}.train_seconds": sft_meta.get("train_seconds"),
        f"{chain.name}.tokens_per_second": sft_meta.get("tokens_per_second"),
        f"{chain.name}.eval_accuracy_before": (ref_meta.get("base") or {}).get("accuracy"),
        f"{chain.name}.eval_accuracy_after": ref_meta["adapter"]["accuracy"],
        **data_metrics([chain]),
    })  # fmt: skip
    for d in mine:
        prefix = f"{chain.name}.{d.target.name}"
        if d.smoke is not None:
            tracker.log_metrics({f"{prefix}.build_seconds": d.engine.meta.get("build_seconds")})
            tracker.log_metrics({f"{prefix}.{k}": v for k, v in d.smoke.meta["metrics"].items()})
            tracker.log_text((d.smoke.path(store) / "report.md").read_text(), f"smoke/{chain.name}/{d.target.name}.md")
        if d.failure:
            tracker.log_text(str(d.failure), f"smoke/{chain.name}/{d.target.name}.FAILED.txt")
        if d.status in (Status.SKIPPED, Status.VERIFIED_ONLY):
            tracker.set_tag(f"ftd.skipped.{prefix}", d.reason)
