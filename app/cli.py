"""`ftd` command line: run the flow on a config, or only validate it."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ftd.errors import ConfigError, FtdError

# What SFT, merging, the smoke test and the og builder import, cheapest and most needed first.
TRAINING_MODULES = ("torch", "transformers", "transformers.models.auto.modeling_auto", "peft", "datasets", "trl",
                    "onnxruntime_genai.models.builder")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftd", description="Fine-tune a LoRA adapter and deploy tested engines.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the finetune_to_deploy flow"), ("validate", "check config and inputs only")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="experiment YAML, e.g. configs/tiny-llama.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config value (repeatable), e.g. --set adapters.0.lora.r=16")  # fmt: skip
        if name == "run":
            p.add_argument("--summary", metavar="PATH", help="also write the run summary as JSON to PATH")
            p.add_argument("--rerun", action="store_true",
                           help="run the flow even when the experiment is up to date (every step a cache hit, "
                           "recorded in Prefect and MLflow)")  # fmt: skip
    p = sub.add_parser("sweep", help="run one flow per point of a sweep, compare, promote the best passing one")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/tiny-llama-lora.yaml")
    p.add_argument("--summary", metavar="PATH", help="also write the sweep summary as JSON to PATH")
    p = sub.add_parser(
        "serve",
        help="deploy the flow for CONFIG to the Prefect server at $PREFECT_API_URL, with an "
        "optional schedule, and run what it schedules or what the UI triggers",
    )
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--name", help="deployment name (default: the experiment name)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (nightly at 03:00 UTC)')
    when.add_argument("--interval", type=int, metavar="SECONDS", help="schedule every N seconds")
    p = sub.add_parser("server", help="start the Prefect and MLflow servers (API + UI) on 127.0.0.1")
    p.add_argument("--artifacts-dir", default="artifacts", help="the stores to serve (default: artifacts)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p = sub.add_parser("verify", help="rehash every stored artifact against its manifest (finds silent corruption)")
    p.add_argument("--artifacts-dir", default="artifacts", help="the artifacts folder (default: artifacts)")
    p.add_argument("--repair", action="store_true", help="delete damaged artifacts so the next run rebuilds them")
    for name, help_text in (("chat", "chat with a registered engine version (one prompt, or a conversation)"),
                            ("deploy", "serve a registered engine version over HTTP (MLflow's scoring server)")):  # fmt: skip
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS (e.g. models:/tiny-llama-onnx-fp32@champion)")
        p.add_argument("--artifacts-dir", default="artifacts",
                       help="whose MLflow database to read (default: artifacts; $MLFLOW_TRACKING_URI wins)")  # fmt: skip
        if name == "chat":
            p.add_argument("--prompt", help="one message: print the answer and exit (else: a conversation on stdin)")
            p.add_argument("--system", help="a system message first")
            p.add_argument("--adapter", help="the adapter to answer with (a bundle serving several)")
            p.add_argument("--max-tokens", type=int, default=64)
            p.add_argument("--json", action="store_true", help="print the whole chat.completion response as JSON")
        else:
            p.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"ftd: config error: {exc}", file=sys.stderr)
        return 2
    except FtdError as exc:
        print(f"ftd: error: {exc}", file=sys.stderr)
        return 1


def _verify(args) -> int:
    from ftd.store import verify_store

    rows = verify_store(Path(args.artifacts_dir), repair=args.repair)
    damaged = [r for r in rows if r["damaged"]]
    for r in damaged:
        action = "removed; the next run rebuilds it" if r["removed"] else "run `ftd verify --repair` to remove it"
        print(f"ftd: damaged {r['stage']}/{r['key']}: {'; '.join(r['damaged'])} ({action})")
    print(f"ftd: verified {len(rows)} artifact(s) in {args.artifacts_dir}: {len(damaged)} damaged")
    return 1 if damaged and not args.repair else 0


def _dispatch(args) -> int:
    if args.command == "verify":
        return _verify(args)
    if args.command == "server":
        from ftd.servers import serve

        return serve(args.artifacts_dir, args.prefect_port, args.mlflow_port)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("chat", "deploy"):
        from app import serving

        return serving.chat(args) if args.command == "chat" else serving.deploy(args)
    from ftd.config import load_config
    from ftd.environment import configure_environment

    cfg = load_config(args.config, args.overrides)
    configure_environment(cfg.artifacts_dir)  # before Prefect/MLflow are imported
    from flows.preflight import preflight
    from ftd.environment import prepare_local_stores
    from ftd.servers import start_run_api_server
    from ftd.tracking import check_reachable, tracking_uri

    if args.command == "run" and not args.rerun:
        from flows.run_records import check

        verdict = check(cfg, tracking_uri(cfg))  # before anything starts: Prefect, MLflow, torch
        if verdict.summary is not None:
            return _report_summary(verdict.summary, args.summary)
        print(f"ftd: running {cfg.experiment}: {verdict.reason}", flush=True)
    # Prefect's API starts while the pre-flight checks run (unless a server is configured, or a
    # fresh store is still to be migrated, below).
    server_started = start_run_api_server(cfg.artifacts_dir, tracking_uri(cfg)) if args.command == "run" else None
    plan = preflight(cfg)  # every input error surfaces here, before anything is computed or tracked
    if args.command == "validate":
        print(f"ftd: {args.config} is valid: {len(cfg.adapters)} adapter(s), {len(cfg.targets)} target(s), "
              f"base {cfg.base_model} ({plan.architecture})")  # fmt: skip
        return 0
    check_reachable(tracking_uri(cfg))
    prepare_local_stores(cfg.artifacts_dir, tracking_uri(cfg))
    if args.command == "run" and server_started is None:
        # A new folder, now migrated: our server rather than Prefect's temporary one (a kill leaks that).
        server_started = start_run_api_server(cfg.artifacts_dir, tracking_uri(cfg))
    from flows.finetune_to_deploy import finetune_to_deploy  # Prefect's client: while its API starts
    from ftd.tracking import preload

    preload(tracking_uri(cfg))
    if server_started:
        # Rather than sleep until the API answers, import what training will need, one module at
        # a time: a cold run gains those seconds, a fully cached run loses at most one import.
        server_started(idle_work=[functools.partial(_import_if_installed, m) for m in TRAINING_MODULES])

    with _prefect_api(os.environ.get("PREFECT_API_URL")):
        summary = finetune_to_deploy(config_path=args.config, overrides=args.overrides, plan=plan)
    return _report_summary(summary, args.summary)


def _prefect_api(url: str | None):
    """Prefect reads PREFECT_API_URL once, when it is first imported; the migration of a new folder
    imports it before the run's server is started, so the URL is handed to it here as well."""
    if not url:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


def _import_if_installed(module: str) -> None:
    with contextlib.suppress(ImportError):  # a backend's package may be absent: its stage says so
        importlib.import_module(module)


def _report_summary(summary: dict, path: str | None) -> int:
    _print_summary(summary)
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


def _serve(args) -> int:
    """A deployment of `finetune_to_deploy` with this config's parameters, served by this process
    (Prefect's `flow.serve`: no work pool needed; see prefect.yaml for the work-pool path)."""
    from ftd.config import load_config
    from ftd.environment import configure_environment

    if not os.environ.get("PREFECT_API_URL"):
        raise FtdError("ftd serve needs a Prefect server: start `ftd server`, then "
                       "export PREFECT_API_URL=http://127.0.0.1:4200/api")  # fmt: skip
    cfg = load_config(args.config, args.overrides)
    configure_environment(cfg.artifacts_dir)
    from flows.preflight import preflight

    preflight(cfg)
    from ftd.environment import prepare_local_stores
    from ftd.tracking import tracking_uri

    prepare_local_stores(cfg.artifacts_dir, tracking_uri(cfg))
    from flows.finetune_to_deploy import finetune_to_deploy

    name = args.name or cfg.experiment
    print(f"ftd: serving deployment finetune_to_deploy/{name} from {os.environ['PREFECT_API_URL']} "
          f"({'cron ' + args.cron if args.cron else f'every {args.interval} s' if args.interval else 'no schedule'})")  # fmt: skip
    finetune_to_deploy.serve(
        name=name, cron=args.cron, interval=args.interval, tags=["ftd"],
        parameters={"config_path": args.config, "overrides": args.overrides},
        description=f"ftd experiment {cfg.experiment} ({args.config})",
    )  # fmt: skip
    return 0


def _sweep(args) -> int:
    from ftd.environment import configure_environment
    from ftd.sweep import load_sweep

    _spec, _runs, configs = load_sweep(args.sweep)
    if len({str(c.artifacts_dir) for c in configs}) != 1:
        from ftd.errors import ConfigError

        raise ConfigError(f"{args.sweep}: every point must share one artifacts_dir (their cached steps are shared)")
    configure_environment(configs[0].artifacts_dir)
    from flows.preflight import preflight
    from ftd.tracking import check_reachable, tracking_uri

    for config in configs:  # every point's inputs, before the first one trains
        preflight(config)
    check_reachable(tracking_uri(configs[0]))
    from ftd.environment import prepare_local_stores

    prepare_local_stores(configs[0].artifacts_dir, tracking_uri(configs[0]))
    from flows.sweep import sweep

    summary = sweep(sweep_path=args.sweep)
    print(f"\nftd: sweep {summary['sweep']} done; MLflow parent run {summary['mlflow_parent_run_id']}")
    for row in summary["points"]:
        print("  " + " | ".join(f"{k}={v}" for k, v in row.items()))
    champion = summary["champion"]
    print("  promoted: " + ("; ".join(champion["aliases"]) if champion else "nothing (no point passed its gates)"))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


def _print_summary(summary: dict) -> None:
    print()
    if summary.get("up_to_date"):
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(summary["recorded_at"]))
        print(f"ftd: experiment {summary['experiment']} is up to date: nothing to run. Its last run ({when}: "
              f"Prefect flow run {summary.get('prefect_flow_run_name') or summary['prefect_flow_run_id']}, "
              f"MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}) passed every gate with these "
              f"inputs, code and libraries, and its {len(summary['stages'])} artifacts are intact. "
              "`ftd run --rerun` runs the flow anyway.")  # fmt: skip
    else:
        print(f"ftd: experiment {summary['experiment']} done; MLflow run {summary['mlflow_run_id']} "
              f"({summary['tracking_uri']})")  # fmt: skip
    for s in summary["stages"]:
        detail = f" ({s['detail']})" if s["detail"] else ""
        print(f"  {s['stage']:<13} {s['label']:<24} {s['status']:<10} {s['seconds']:>8.2f}s{detail}")
    for r in summary["registered"]:
        print(f"  registered {r['kind']} {r['item']}: {r['name']} v{r['version']}{'' if r['new'] else ' (existing)'}")
    print("  metrics: " + json.dumps({k: v for k, v in summary["metrics"].items()}, default=str))


def entry() -> None:
    """The `ftd` command: `main`, then a quick exit.

    Once `main` has returned and the exit handlers have run (Prefect's last logs and events, the
    run's API server stopped), tearing down an interpreter that has loaded torch, onnxruntime and
    Prefect still takes ~2 s on 2 cores and does nothing for the user, so the process ends there."""
    code = 1  # main raised: the traceback is printed before the exit handlers run

    def finish() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(finish)  # registered first, so it runs after every other exit handler
    code = main()
    sys.exit(code)


if __name__ == "__main__":
    entry()
