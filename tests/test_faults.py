"""Faults that need files on disk: truncated or corrupted weights, adapters from another base, and
pickles crafted to run code — each refused with a message naming the file, nothing executed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from ftd.builtin_models import build_tiny_model
from ftd.errors import FtdError
from ftd.integrity import check_safetensors
from tests.conftest import ROOT, run_ftd
from tests.test_merge import build_base, make_adapter

IMPORTED = ROOT / "data" / "adapters" / "numbers-rslora-r16"


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def import_override(path: Path) -> str:
    return (f"adapters.1={{name: imp, import_from: {path}, data: {{train: data/numbers/train.jsonl, "
            "eval: data/numbers/eval.jsonl}}")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    out.mkdir()
    build_tiny_model("tiny-llama", out)
    return out


def test_truncated_base_weights_are_named_before_compute(tiny_llama_dir: Path, tmp_path: Path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    shard = next(base.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])  # an interrupted download
    artifacts = tmp_path / "artifacts"
    result = run_ftd(artifacts, "--set", f"base_model={base}")
    assert result.code == 2
    assert re.search(rf"base_model: {re.escape(str(shard))}: truncated safetensors file", one_line_error(result))
    assert not (artifacts / "store").exists()


def test_corrupted_adapter_header_is_named_before_compute(tmp_path: Path):
    adapter = tmp_path / "adapter"
    shutil.copytree(IMPORTED, adapter)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00" * 32  # garbage in the JSON header
    weights.write_bytes(bytes(data))
    artifacts = tmp_path / "artifacts"
    result = run_ftd(artifacts, "--set", import_override(adapter))
    assert result.code == 2
    assert "adapters.imp.import_from: " in one_line_error(result) and "corrupted safetensors header" in result.stderr
    assert not (artifacts / "store").exists()


def test_adapter_of_another_shape_is_refused_naming_both(tmp_path: Path):
    from transformers import LlamaConfig

    other = build_base(tmp_path / "other", config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=512))  # fmt: skip
    make_adapter(other, tmp_path / "adapter")
    artifacts = tmp_path / "artifacts"
    result = run_ftd(artifacts, "--set", import_override(tmp_path / "adapter"))
    assert result.code == 2
    line = one_line_error(result)
    assert re.search(r"adapter tensor \S+lora_A.weight has \d+ input features but LlamaForCausalLM's \S+ has \d+", line)
    assert "trained on another base model" in line and not (artifacts / "store").exists()


@pytest.mark.e2e  # over 15 s: real processes
def test_adapter_recorded_on_another_base_is_refused_before_training(tmp_path: Path):
    adapter = tmp_path / "adapter"
    shutil.copytree(IMPORTED, adapter)  # same shapes as tiny-llama ...
    record = {"base_key": "0" * 20, "base_source": "/models/another-tiny-llama", "base_content_digest": None}
    (adapter / "ftd-base.json").write_text(json.dumps(record))  # ... but ftd recorded another base
    artifacts = tmp_path / "artifacts"
    result = run_ftd(artifacts, "--set", import_override(adapter))
    assert result.code == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("ftd: error: ")]
    assert (
        "was trained on base '/models/another-tiny-llama'" in line
        and "this experiment's base is 'builtin:tiny-llama'" in line
    )
    assert not (artifacts / "store" / "adapter").exists(), "nothing was trained"


@pytest.mark.parametrize("damage", ["truncate", "header-length", "trailing-bytes", "wrong-range"])
def test_integrity_check_catches_each_kind_of_damage(tmp_path: Path, damage: str):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, path)
    assert set(check_safetensors(path)) == {"a", "b"}
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-8]
    elif damage == "header-length":
        data[0:8] = (10**9).to_bytes(8, "little")
    elif damage == "trailing-bytes":
        data += b"\x00" * 16
    else:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        header["a"]["shape"] = [4, 5]
        text = json.dumps(header).encode().ljust(header_len)
        data[8 : 8 + header_len] = text[:header_len]
    path.write_bytes(bytes(data))
    with pytest.raises(FtdError, match=str(path)):
        check_safetensors(path)


# ---------------------------------------------------------------- pickles that run code on load


class Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _payload(marker: Path) -> Payload:
    return Payload(f"touch {shlex.quote(str(marker))}")


def _pickle_adapter(tmp_path: Path, marker: Path) -> Path:
    build_base(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    torch.save({key: _payload(marker)}, tmp_path / "adapter" / "adapter_model.bin")
    return tmp_path / "adapter"


def _pickle_base(tmp_path: Path, marker: Path) -> Path:
    base = build_base(tmp_path / "base")
    for shard in base.glob("*.safetensors"):
        shard.unlink()
    (base / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save({"model.embed_tokens.weight": _payload(marker)}, base / "pytorch_model.bin")
    return base


def _read_with(reader: str, tmp_path: Path, marker: Path) -> None:
    from ftd.config import MergeSettings

    if reader == "trtllm-convert":
        from tasks.backends.tensorrt_llm.lora import convert

        convert("evil", _pickle_adapter(tmp_path, marker), "fp16")
    elif reader == "dashinfer-bundle":
        from tasks.backends.dashinfer.lora_bundle import rewrite_adapter

        rewrite_adapter("evil", _pickle_adapter(tmp_path, marker), tmp_path / "out")
    elif reader == "adapter-import":
        from tasks.merge import read_adapter

        read_adapter(_pickle_adapter(tmp_path, marker))
    elif reader == "merge-base-bin":
        from tasks.merge import stream_merge

        base = _pickle_base(tmp_path / "b", marker)
        make_adapter(build_base(tmp_path / "good"), tmp_path / "adapter")
        (tmp_path / "out").mkdir()
        stream_merge(base, tmp_path / "adapter", tmp_path / "out", MergeSettings())
    elif reader == "model-load":
        from tasks.modeling import load_model

        load_model(_pickle_base(tmp_path, marker))
    elif reader == "accessory-shards":
        from tasks.backends.accessory.export import load_accessory

        out = tmp_path / "acc"
        out.mkdir()
        torch.save({"model": {"llma.norm.weight": _payload(marker)}}, out / "consolidated.00-of-01.model.pth")
        (out / "config.json").write_text("{}")
        load_accessory(out)


@pytest.mark.parametrize(
    "reader",
    ["adapter-import", "trtllm-convert", "dashinfer-bundle", "merge-base-bin", "model-load", "accessory-shards"],
)
def test_code_in_a_pickle_never_runs(tmp_path: Path, reader: str):
    """Every place ftd reads weights that may be pickles. The control proves the payload is live."""
    control = tmp_path / "control-ran"
    torch.save({"x": _payload(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "payload-ran"
    with pytest.raises(Exception) as info:
        _read_with(reader, tmp_path, marker)
    assert not marker.exists(), f"{reader} executed code from a pickle"
    assert isinstance(info.value, FtdError | OSError | RuntimeError | ValueError) or "weights_only" in str(info.value)
