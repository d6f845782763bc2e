"""Up-to-date check: an unchanged, already successful experiment answers in a second.

Every successful run that built or found *everything* (no gate failed, nothing skipped) leaves
a run record in `<artifacts>/run-records/<fingerprint>.json`: its summary. The fingerprint covers
everything any stage key can depend on, and more:

- the loaded config (overrides applied), the tracking URI;
- the content of every input: data sources (files, folders, a pinned hub dataset; an unpinned
  one is never up to date), imported adapters, the base model (a builtin's
  recipe key; a local model's content hash, memoised like the base stage does; a hub model only
  when pinned to a commit, since an unpinned id can move on the hub);
- the source of ftd itself (ftd/, tasks/, flows/, app/) and every installed distribution's version.

`ftd run` looks the fingerprint up before it starts Prefect or MLflow. If the record exists and
every artifact it lists is still in the store at its recorded sizes, the run is up to date: the
recorded summary is printed and nothing runs, so neither a Prefect flow run nor an MLflow run is
recorded for it. `ftd run --rerun` always runs the flow (every step a cache hit, all recorded,
registry versions re-checked). Scheduled and UI-triggered runs always run the flow.

Skipped steps are never recorded: what a machine could not build (no GPU, no package) must be
tried again where it can be.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftd.config import ExperimentConfig
from ftd.errors import ConfigError
from ftd.store import Store, digest, file_digest, tree_digest
from tasks.base_model import builtin_key, parse_base, weights_digest
from tasks.data import data_sources, source_digest

RECORDS = "run-records"
SOURCE_DIRS = ("ftd", "tasks", "flows", "app")
PINNED_REVISION = re.compile(r"^[0-9a-f]{40}$")


def fingerprint_parts(cfg: ExperimentConfig, tracking_uri: str) -> dict[str, str] | None:
    """Everything the run's outputs depend on, one digest per kind of input (their hash names the
    record; the parts are kept in it, so a miss can be explained). None when that cannot be known
    cheaply: a hub model that is not pinned to a commit."""

    spec = parse_base(cfg.base_model, cfg.revision)
    if spec.kind == "builtin":
        base = builtin_key(spec.name)
    elif spec.kind == "local":
        base = weights_digest(Path(spec.name), Store(cfg.artifacts_dir))
    elif spec.revision and PINNED_REVISION.match(spec.revision):
        base = f"{spec.name}@{spec.revision}"
    else:
        return None
    inputs = []
    for adapter in cfg.adapters:
        try:
            sources = data_sources(adapter.data).values()
        except ConfigError:  # a missing source: not up to date, and pre-flight names it
            return None
        data = [source_digest(source) for source in sources]
        if None in data:  # an unpinned hub dataset can change on the hub: never up to date
            return None
        inputs += data
        if adapter.import_from is not None:
            inputs.append(tree_digest(Path(adapter.import_from)))
    return {"config": digest(cfg), "tracking_uri": tracking_uri, "base": base, "inputs": digest(inputs),
            "source": _source_digest(), "libraries": digest(_installed_distributions())}  # fmt: skip


def record_run(cfg: ExperimentConfig, tracking_uri: str, summary: dict[str, Any]) -> Path | None:
    """Keep the summary of a passing run; returns the record's path (None: not recorded, because a
    step or a smoke test was skipped or the base cannot be fingerprinted)."""
    if any(s["status"] == "skipped" for s in summary["stages"]):
        return None
    try:
        parts = fingerprint_parts(cfg, tracking_uri)
    except OSError:  # an input changed under the run: the next run simply runs
        return None
    if parts is None:
        return None
    path = Path(cfg.artifacts_dir).resolve() / RECORDS / f"{digest(parts)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    record = {"recorded_at": time.time(), "fingerprint": parts, "summary": summary}
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path


@dataclass
class Verdict:
    """The up-to-date check's answer: the recorded summary, or why the flow must run."""

    summary: dict[str, Any] | None
    reason: str = ""


# The fingerprint's parts, as a user would name what changed.
PART_NAMES = {"config": "the config", "tracking_uri": "the tracking URI", "base": "the base model",
              "inputs": "the data or imported adapters", "source": "ftd's code", "libraries": "the installed libraries"}  # fmt: skip


def check(cfg: ExperimentConfig, tracking_uri: str) -> Verdict:
    """Up to date when this exact experiment already ran to completion and every artifact it lists
    is intact (sizes checked, like a cache hit); otherwise the reason, naming what changed since
    the experiment's last passing run when there is one."""
    try:
        parts = fingerprint_parts(cfg, tracking_uri)
    except OSError:  # a missing or unreadable input: pre-flight names it, with the field
        return Verdict(None, "an input cannot be read")
    if parts is None:
        return Verdict(
            None, "its base model is a hub id without a pinned commit (`revision`), which can move on the hub"
        )
    folder = Path(cfg.artifacts_dir).resolve() / RECORDS
    path = folder / f"{digest(parts)}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        store = Store(cfg.artifacts_dir)
        lost = [
            f"{s['stage']}/{s['key'][:12]}" for s in record["summary"]["stages"] if not store.has(s["stage"], s["key"])
        ]
        if not lost:
            summary = dict(record["summary"], up_to_date=True, recorded_at=record["recorded_at"])
            summary["stages"] = [dict(s, status="up to date", seconds=0.0) for s in summary["stages"]]
            return Verdict(summary)
        return Verdict(None, f"artifacts of its last passing run are missing or damaged: {', '.join(lost[:3])}")
    previous = _latest_record(folder, cfg.experiment)
    if previous is None:
        return Verdict(None, "no passing run of it is recorded in this artifacts folder")
    changed = [words for part, words in PART_NAMES.items() if previous.get("fingerprint", {}).get(part) != parts[part]]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(previous["recorded_at"]))
    return Verdict(None, f"since its last passing run ({when}) {' and '.join(changed) or 'something'} changed")


def _latest_record(folder: Path, experiment: str) -> dict[str, Any] | None:
    records = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        with suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            if record["summary"]["experiment"] == experiment:
                records.append(record)
    return max(records, key=lambda r: r["recorded_at"], default=None)


def _source_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    files = sorted(p for d in SOURCE_DIRS for p in (root / d).rglob("*.py"))
    return digest([(p.relative_to(root).as_posix(), file_digest(p)) for p in files])


def _installed_distributions() -> list[str]:
    """Every distribution installed in this environment with its version, from the `*.dist-info`
    folder names of its site-packages (one directory listing: far cheaper than asking
    importlib.metadata one by one). Not from `sys.path`: libraries add entries to it at run time."""
    folders = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    return sorted(
        name
        for folder in folders
        if os.path.isdir(folder)
        for name in os.listdir(folder)
        if name.endswith((".dist-info", ".egg-info"))
    )
