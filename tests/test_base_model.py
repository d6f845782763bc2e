"""`base_model` resolution: builtin names, local HF directories (content-hashed, memoised) and
hub ids are told apart without loading anything; keys follow content, not paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ftd.store as store_module
from ftd.builtin_models import build_tiny_model
from ftd.errors import ConfigError
from ftd.store import Store
from tasks.base_model import parse_base, resolve_base


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("local") / "tiny"
    build_tiny_model("tiny-llama", path)
    return path


def test_parse_base_kinds(local_model: Path) -> None:
    assert parse_base("builtin:tiny-llama").kind == "builtin"
    assert parse_base(str(local_model)).kind == "local"
    hub = parse_base("Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    assert (hub.kind, hub.name, hub.revision) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct", "main")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_base("./models/nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        parse_base(str(local_model.parent))


def test_local_model_key_is_content_not_path_and_hashes_are_memoised(
    local_model: Path, tmp_path: Path, monkeypatch
) -> None:
    store = Store(tmp_path / "artifacts")
    first = resolve_base(parse_base(str(local_model)), store)
    assert first.meta["architecture"] == "LlamaForCausalLM"
    assert first.meta["model_dir"] == str(local_model.resolve())

    reads = []
    real = store_module.file_digest
    monkeypatch.setattr(store_module, "file_digest", lambda p: reads.append(p) or real(p))
    assert resolve_base(parse_base(str(local_model)), store).key == first.key
    assert reads == []  # unchanged files are not read again

    moved = tmp_path / "elsewhere"
    shutil.copytree(local_model, moved)
    assert resolve_base(parse_base(str(moved)), store).key == first.key  # same content, other path
    (moved / "config.json").write_text(
        (moved / "config.json").read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1)
    )
    assert resolve_base(parse_base(str(moved)), store).key != first.key  # content changed
