"""What makes `ftd run` start fast, and why each shortcut is safe: the migrated-store marker, the
cached base inspection, the run-scoped Prefect API server, and SFT that does not depend on what
ran before it in the process."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from flows import preflight
from ftd import environment
from ftd.config import load_config
from tests.conftest import DEFAULT_CONFIG


@pytest.fixture
def stores(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"


def _mark_ready(artifacts: Path, uri: str) -> None:
    (artifacts / "prefect").mkdir()
    (artifacts / "prefect" / "prefect.db").write_bytes(b"")
    (artifacts / "mlflow.db").write_bytes(b"")
    (artifacts / "locks").mkdir()
    (artifacts / "locks" / "databases.ready").write_text(environment._ready_stamp(artifacts, uri))


def test_stores_ready_needs_the_marker_and_both_databases(stores) -> None:
    artifacts, uri = stores
    assert not environment.stores_ready(artifacts, uri)
    _mark_ready(artifacts, uri)
    assert environment.stores_ready(artifacts, uri)
    (artifacts / "mlflow.db").unlink()  # a deleted database is migrated again
    assert not environment.stores_ready(artifacts, uri)


def test_an_upgraded_library_invalidates_the_marker(stores) -> None:
    artifacts, uri = stores
    _mark_ready(artifacts, uri)
    stamp = json.loads((artifacts / "locks" / "databases.ready").read_text())
    (artifacts / "locks" / "databases.ready").write_text(json.dumps({**stamp, "mlflow": "0.0.1"}))
    assert not environment.stores_ready(artifacts, uri)
    assert not environment.stores_ready(artifacts, f"sqlite:///{artifacts / 'other.db'}")  # another store


def test_a_copied_artifacts_folder_is_still_ready(stores, monkeypatch) -> None:
    import shutil

    artifacts, uri = stores
    _mark_ready(artifacts, uri)
    copy = artifacts.parent / "copy"
    shutil.copytree(artifacts, copy)
    monkeypatch.setenv("PREFECT_HOME", str(copy / "prefect"))
    assert environment.stores_ready(copy, f"sqlite:///{copy / 'mlflow.db'}")


def test_no_run_server_for_a_configured_server_or_unmigrated_stores(stores, monkeypatch) -> None:
    from ftd.servers import start_run_api_server

    artifacts, uri = stores
    assert start_run_api_server(artifacts, uri) is None  # not migrated yet: the CLI asks again once it is
    _mark_ready(artifacts, uri)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert start_run_api_server(artifacts, uri) is None  # the user's server is used


def test_base_inspection_is_cached_only_after_every_check_passed(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path}", "adapters.0.lora.target_modules=[nope_proj]"])
    with pytest.raises(Exception, match="nope_proj"):
        preflight.preflight(cfg)
    assert not (tmp_path / "cache").exists()

    cfg = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path}"])
    first = preflight.preflight(cfg)
    [cached] = (tmp_path / "cache" / "preflight").iterdir()

    def inspect_again(*_args):
        raise AssertionError("the base model was inspected again")

    monkeypatch.setattr(preflight, "_inspect_base", inspect_again)
    assert preflight.preflight(cfg) == first
    # The cached module list still catches a bad target module.
    bad = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path}", "adapters.0.lora.target_modules=[nope_proj]"])
    with pytest.raises(Exception, match=r"\['nope_proj'\] not in LlamaForCausalLM"):
        preflight.preflight(bad)
    assert json.loads(cached.read_text())["architecture"] == "LlamaForCausalLM"


def test_a_changed_local_config_is_inspected_again(tmp_path: Path, monkeypatch) -> None:
    from ftd.builtin_models import BUILTINS, make_config

    base = tmp_path / "base"
    base.mkdir()
    make_config(BUILTINS["tiny-llama"]).to_json_file(base / "config.json")
    spec = preflight.parse_base(str(base))
    cfg = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path / 'a'}"])
    path_before, _ = preflight._cached_inspection(spec, cfg)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    path_after, _ = preflight._cached_inspection(spec, cfg)
    assert path_before != path_after


def test_sft_does_not_depend_on_the_random_state_before_it(tmp_path: Path) -> None:
    """The LoRA A matrices are drawn when the trainer wraps the model; the adapter must be the same
    whatever consumed random numbers earlier in the process (another adapter, a previous stage)."""
    import torch
    from safetensors.torch import load_file

    from ftd.store import Store
    from tasks.base_model import parse_base, resolve_base
    from tasks.data import prepare_data
    from tasks.sft import _train

    cfg = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path}", "adapters.0.sft.max_steps=2",
                                       "adapters.0.sft.save_steps=0"])  # fmt: skip
    store = Store(cfg.artifacts_dir)
    base = resolve_base(parse_base(cfg.base_model), store)
    data = prepare_data(cfg.adapters[0].data, store)
    outputs = []
    for i, draws in enumerate((0, 1000)):
        torch.rand(draws)
        out = tmp_path / f"out{i}"
        _train(base, data, cfg.adapters[0], store, False, out, tmp_path / f"ck{i}")
        outputs.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


@pytest.mark.e2e  # over 15 s: real processes
def test_two_process_sft_trains_one_adapter(tmp_path: Path) -> None:
    """`sft.num_processes: 2` runs SFT under torchrun (gloo on CPU): two data-parallel ranks, one
    adapter written by rank 0, stored like any other."""
    from safetensors.torch import load_file

    from ftd.store import Store
    from tasks.base_model import parse_base, resolve_base
    from tasks.data import prepare_data
    from tasks.sft import STEP_SECONDS, adapter_dir, train_adapter

    cfg = load_config(DEFAULT_CONFIG, [f"artifacts_dir={tmp_path}", "adapters.0.sft.max_steps=4",
                                       "adapters.0.sft.num_processes=2", "adapters.0.sft.logging_steps=1"])  # fmt: skip
    store = Store(cfg.artifacts_dir)
    base = resolve_base(parse_base(cfg.base_model), store)
    data = prepare_data(cfg.adapters[0].data, store)
    adapter = train_adapter(base, data, cfg.adapters[0], store)
    assert adapter.meta["num_processes"] == 2 and adapter.meta["steps"] == 4
    assert adapter.meta["world_size"] == 2  # one DDP group, not two independent runs
    step_seconds = json.loads((adapter.path(store) / STEP_SECONDS).read_text())  # rank 0's clock, step by step
    assert len(step_seconds) == 4
    assert adapter.meta["median_step_seconds"] == pytest.approx(statistics.median(step_seconds), abs=1e-5)
    weights = load_file(adapter_dir(adapter, store) / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert not list((tmp_path / "store" / "adapter").glob("*/distributed-job.json"))
