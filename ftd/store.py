"""Content-addressed artifact store: `<root>/store/<stage>/<key>/`.

A key is a hash of what determines a stage's output: the stage name, its code version, its config
section, its inputs' keys (lineage hashing: large weights are hashed once, at the source, and
downstream keys are hashes of keys) and the versions of the libraries it calls. Paths and times
never enter a key.

An artifact is built in a temporary directory beside the store and renamed into place only when
complete (rename is atomic on one filesystem), so a crash never leaves a directory that a later
run would take for a finished artifact. A per-key file lock makes concurrent runs of the same
step wait for one another instead of building twice.

The manifest lists every file with its size and sha256. A cache hit checks the sizes (cheap: a
truncated or deleted file makes the artifact count as absent, so it is rebuilt); `verify_store`
(`ftd verify`) rehashes everything and finds a flipped bit inside a file of the right size.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "ftd-manifest.json"
log = logging.getLogger("ftd.store")


class Artifact(BaseModel):
    """A finished artifact: where it lives (relative to the store root) and what it recorded."""

    stage: str
    key: str
    meta: dict[str, Any] = {}
    cached: bool = False

    def path(self, store: Store) -> Path:
        return store.path(self.stage, self.key)


def canonical_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any, length: int = 20) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else canonical_json(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path, exclude: Iterable[str] = (), memo: dict[str, str] | None = None) -> str:
    """Hash of every file's relative name and content under `root` (order-independent).

    With `memo`, a file's sha256 is reused while its (path, size, mtime, inode) is unchanged:
    the result is still a content hash; the stat only decides whether the file is read again."""
    excluded = set(exclude)
    entries = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part in excluded for part in p.relative_to(root).parts):
            continue
        content = file_digest(p) if memo is None else memoised_file_digest(p, memo)
        entries.append((p.relative_to(root).as_posix(), content))
    return digest(entries, length=64)


def memoised_file_digest(path: Path, memo: dict[str, str]) -> str:
    """A file's sha256, reused from `memo` while its (path, size, mtime, inode) is unchanged."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return memo[stamp] if stamp in memo else memo.setdefault(stamp, file_digest(path))


@contextmanager
def hash_memo(root: Path):
    """The store's memo of file hashes (`memoised_file_digest`): loaded, then written back atomically."""
    path = Path(root) / "hash-memo.json"
    memo = json.loads(path.read_text()) if path.is_file() else {}
    yield memo
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, path)


def code_version(*files: str | Path) -> str:
    """Hash of the source files a stage's output depends on."""
    return digest([Path(f).read_bytes() for f in files])


def library_versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created with its folder) for the block: between processes, and
    between threads of one process (each call opens its own file description)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under `root` (the manifest aside): size and sha256, by relative path."""
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def damaged_files(root: Path, manifest: dict, full: bool) -> list[str]:
    """Files missing, of another size, or (with `full`) with other content than the manifest says.
    Manifests written before files were recorded list none: nothing to check."""
    damaged = []
    for name, record in (manifest.get("files") or {}).items():
        path = root / name
        if not path.is_file():
            damaged.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"]:
            damaged.append(f"{name}: {path.stat().st_size} bytes, recorded {record['bytes']}")
        elif full and file_digest(path) != record["sha256"]:
            damaged.append(f"{name}: content differs from its recorded sha256")
    return damaged


def verify_store(root: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rehash every stored artifact; with `repair`, delete the damaged ones so the next run
    rebuilds them. Returns one row per artifact: stage, key, damaged files."""
    rows = []
    store = Store(root)
    for manifest_file in sorted((store.root / "store").glob("*/*/" + MANIFEST)):
        directory = manifest_file.parent
        stage, key = directory.parent.name, directory.name
        with store._lock(stage, key):
            damaged = damaged_files(directory, json.loads(manifest_file.read_text()), full=True)
            if damaged and repair:
                shutil.rmtree(directory)
        rows.append({"stage": stage, "key": key, "damaged": damaged, "removed": bool(damaged and repair)})
    return rows


def link_or_copy(src: Path, dst: Path) -> None:
    """Place a stored file in another artifact: a hard link (no bytes copied), or a copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_key(stage: str, *, code: str, config: Any, inputs: Iterable[str], libraries: dict[str, str]) -> str:
    return digest({"stage": stage, "code": code, "config": config, "inputs": list(inputs), "libs": libraries})


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / "store" / stage / key

    def has(self, stage: str, key: str) -> bool:
        """A complete artifact: its manifest, and every file it lists at the recorded size."""
        manifest_file = self.path(stage, key) / MANIFEST
        if not manifest_file.is_file():
            return False
        damaged = damaged_files(self.path(stage, key), json.loads(manifest_file.read_text()), full=False)
        if damaged:
            log.warning("artifact %s/%s is damaged (%s); it will be rebuilt", stage, key, "; ".join(damaged[:3]))
        return not damaged

    def load(self, stage: str, key: str) -> Artifact:
        manifest = json.loads((self.path(stage, key) / MANIFEST).read_text())
        return Artifact(stage=stage, key=key, meta=manifest.get("meta", {}), cached=True)

    def _lock(self, stage: str, key: str):
        return file_lock(self.root / "locks" / f"{stage}-{key}.lock")

    def materialize(
        self, stage: str, key: str, build: Callable[[Path], dict[str, Any]], lineage: dict[str, Any] | None = None
    ) -> Artifact:
        """Return the artifact for `key`, building it with `build(tmp_dir) -> meta` if absent."""
        if self.has(stage, key):
            return self.load(stage, key)
        with self._lock(stage, key):
            if self.has(stage, key):  # another process built it while we waited
                return self.load(stage, key)
            for leftover in (self.root / "tmp").glob(f"{stage}-{key}-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # from a killed build: we hold its lock now
            tmp = self.root / "tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                started = time.perf_counter()
                meta = build(tmp) or {}
                meta.setdefault("seconds", round(time.perf_counter() - started, 3))
                manifest = {"stage": stage, "key": key, "lineage": lineage or {}, "meta": meta,
                            "files": file_records(tmp)}  # fmt: skip
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
                final = self.path(stage, key)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # an incomplete leftover from an older layout: never reuse it
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Artifact(stage=stage, key=key, meta=meta, cached=False)
