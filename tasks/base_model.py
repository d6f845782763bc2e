"""Resolve `base_model` (builtin:NAME, local HF directory, or hub id) to a hashed artifact.

Builtins are built into the store. Local and hub models stay where they are (copying 15 GB
would be waste); the artifact records their directory and its content hash, which becomes the
root of every downstream key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftd import builtin_models
from ftd.errors import ConfigError, FtdError
from ftd.integrity import check_weight_dir
from ftd.store import (
    MANIFEST,
    Artifact,
    Store,
    code_version,
    file_digest,
    hash_memo,
    library_versions,
    stage_key,
    tree_digest,
)

STAGE = "base"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class BaseSpec:
    """What the base_model string means, decided without loading anything."""

    kind: str  # "builtin" | "local" | "hub"
    name: str
    revision: str | None = None


def parse_base(value: str, revision: str | None = None) -> BaseSpec:
    """Classify `base_model`; raises ConfigError naming the field when it can be none of them."""
    if value.startswith("builtin:"):
        name = value.removeprefix("builtin:")
        if name not in builtin_models.BUILTINS:
            known = ", ".join(f"builtin:{n}" for n in builtin_models.BUILTINS)
            raise ConfigError(f"base_model: unknown builtin {value!r}; known: {known}")
        return BaseSpec("builtin", name)
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"base_model: {path} has no config.json; expected a Hugging Face model directory")
        return BaseSpec("local", str(path.resolve()))
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") != 1
    if looks_like_path or not HUB_ID.match(value):
        raise ConfigError(
            f"base_model: {value!r} does not exist (expected builtin:NAME, a local directory or a hub id)"
        )
    return BaseSpec("hub", value, revision)


def resolve_base(spec: BaseSpec, store: Store) -> Artifact:
    if spec.kind == "builtin":
        return _build_builtin(spec.name, store)
    model_dir = Path(spec.name) if spec.kind == "local" else download(spec)

    check_weight_dir(model_dir)  # before hashing: a truncated download is named, not trained on
    content = weights_digest(model_dir, store)
    key = stage_key(STAGE, code=code_version(__file__), config={"kind": "external"}, inputs=[content], libraries={})

    def record(tmp: Path) -> dict:
        return {"model_dir": str(model_dir), "source": spec.name, "content_digest": content, **_describe(model_dir)}

    return store.materialize(STAGE, key, record, lineage={"source": spec.name})


def builtin_key(name: str) -> str:
    recipe = builtin_models.BUILTINS[name]
    return stage_key(
        STAGE,
        code=code_version(builtin_models.__file__),
        config={"builtin": name, "recipe": recipe.to_dict()},
        inputs=[file_digest(builtin_models.CORPUS)],
        libraries=library_versions("torch", "transformers", "tokenizers"),
    )


def _build_builtin(name: str, store: Store) -> Artifact:
    key = builtin_key(name)
    path = store.path(STAGE, key)

    def build(tmp: Path) -> dict:
        info = builtin_models.build_tiny_model(name, tmp)
        return {"source": f"builtin:{name}", **info, **_describe(tmp)}

    artifact = store.materialize(STAGE, key, build, lineage={"source": f"builtin:{name}"})
    artifact.meta["model_dir"] = str(path)  # the store path is only known after the rename
    return artifact


def download(spec: BaseSpec) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, or a missing repo: all need the user's action
        raise FtdError(f"base_model: could not fetch {spec.name!r} from the hub: {type(exc).__name__}: {exc}") from None


def weights_digest(model_dir: Path, store: Store) -> str:
    """Content hash of the files that define the model (weights, config, tokenizer).

    Hashing 15 GB of weights on every run would cost minutes, so file hashes are memoised in the
    store (see `tree_digest`)."""
    with hash_memo(store.root) as memo:
        return tree_digest(model_dir, exclude={".cache", ".git"}, memo=memo)


def _describe(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "weight_files": sorted(p.name for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)),
    }


def files_digest(folder: Path) -> str:
    """The digest of a base model's files (weights, config, tokenizer), wherever the folder is:
    what a registered adapter records of its base, and checks when it is loaded."""
    return tree_digest(folder, exclude={".cache", ".git", MANIFEST})


def fetch(source: str, revision: str | None, corpus: Path = builtin_models.CORPUS) -> Path:
    """A base model's folder from its `base_model` value: rebuilt (builtin, its tokenizer from
    `corpus`), found (local), or downloaded (hub)."""
    import tempfile

    spec = parse_base(source, revision)
    if spec.kind == "builtin":
        folder = Path(tempfile.mkdtemp(prefix="ftd-base-"))
        builtin_models.build_tiny_model(spec.name, folder, corpus)
        return folder
    return Path(spec.name) if spec.kind == "local" else download(spec)


def model_dir(base: Artifact) -> Path:
    return Path(base.meta["model_dir"])
