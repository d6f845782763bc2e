"""The streaming LoRA merge (tasks/merge.py) against peft's own `merge_and_unload`.

Every check builds a tiny model in tmp_path, trains nothing: the LoRA weights are set to random
non-zero values so the merge is non-trivial, and the result is compared tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ftd.config import MergeSettings
from ftd.errors import FtdError
from tasks.merge import stream_merge

LLAMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=64,
)  # fmt: skip
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SHARD = "20KB"


def build_base(path: Path, model_cls=LlamaForCausalLM, config=None, dtype=torch.float32, shard=SHARD) -> Path:
    torch.manual_seed(0)
    model = model_cls(config or LlamaConfig(**LLAMA)).to(dtype)
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=True)
    return path


def random_peft(
    base_dir: Path, adapter_dir: Path, *, dtype=torch.float32, autocast_adapter_dtype=True, seed: int = 1, **lora
):  # fmt: skip
    """Save a peft LoRA adapter with random, non-trivial A and B; return the live peft model."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **lora}
    peft_model = get_peft_model(model, LoraConfig(**lora), autocast_adapter_dtype=autocast_adapter_dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return peft_model


def make_adapter(base_dir: Path, adapter_dir: Path, **kwargs):
    """A random adapter saved to `adapter_dir`; returns peft's merged model for comparison."""
    return random_peft(base_dir, adapter_dir, **kwargs).merge_and_unload().eval()


def merge(base_dir: Path, adapter_dir: Path, out: Path, **settings) -> dict:
    out.mkdir()
    return stream_merge(base_dir, adapter_dir, out, MergeSettings(**settings))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def assert_bitwise_equal(merged_dir: Path, reference) -> None:
    ours = read_weights(merged_dir)
    theirs = reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    differing = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert not differing, f"not bitwise equal to peft's merge: {differing}"


def assert_changed(base_dir: Path, merged_dir: Path, suffixes) -> None:
    base, merged = read_weights(base_dir), read_weights(merged_dir)
    targeted = [name for name in base if name.removesuffix(".weight").endswith(tuple(suffixes))]
    assert targeted
    for name in targeted:
        assert not torch.equal(base[name], merged[name]), f"{name} was not merged"


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("llama-base"))


def test_sharded_merge_is_bitwise_equal_to_peft(llama_base, tmp_path):
    base_shards = sorted(llama_base.glob("*.safetensors"))
    assert len(base_shards) >= 2 and (llama_base / "model.safetensors.index.json").is_file()
    reference = make_adapter(llama_base, tmp_path / "adapter")
    out = tmp_path / "merged"

    stats = merge(llama_base, tmp_path / "adapter", out)

    assert stats["shards"] == len(base_shards)
    assert stats["merged_modules"] == LlamaConfig(**LLAMA).num_hidden_layers * len(LLAMA_TARGETS)
    assert_changed(llama_base, out, LLAMA_TARGETS)
    assert_bitwise_equal(out, reference)
    # one output shard per input shard, under the same names, and an index covering every tensor
    assert sorted(p.name for p in out.glob("*.safetensors")) == [p.name for p in base_shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weights = read_weights(out)
    assert set(index["weight_map"]) == set(weights)
    assert all((out / shard).is_file() for shard in index["weight_map"].values())
    for name, shard in index["weight_map"].items():
        assert name in load_file(out / shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert (out / "config.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_single_file_base_writes_no_index(tmp_path):
    base = build_base(tmp_path / "base", shard="10MB")
    assert (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").exists()
    reference = make_adapter(base, tmp_path / "adapter")
    merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert [p.name for p in (tmp_path / "merged").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "merged" / "model.safetensors.index.json").exists()
    assert_bitwise_equal(tmp_path / "merged", reference)


def test_one_shard_base_with_index_keeps_its_index(tmp_path):
    """A hub checkpoint stored as model-00001-of-00001.safetensors plus an index (as bench/synth.py
    writes one; found on the GPU check): without the index the merged model does not load."""
    base = build_base(tmp_path / "base", shard="10MB")
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    names = list(load_file(base / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    reference = make_adapter(base, tmp_path / "adapter")
    merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert_bitwise_equal(tmp_path / "merged", reference)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_legacy_bin_base_with_tied_weights(tmp_path):
    """An old `pytorch_model.bin` may store tied tensors under both names, sharing one storage."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True))
    base = tmp_path / "base"
    model.config.save_pretrained(base)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, base / "pytorch_model.bin")
    reference = make_adapter(base, tmp_path / "adapter")

    merge(base, tmp_path / "adapter", tmp_path / "merged")

    assert [p.name for p in (tmp_path / "merged").glob("*.safetensors")] == ["model.safetensors"]
    assert_bitwise_equal(tmp_path / "merged", reference)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_rslora_merge_is_bitwise_equal_to_peft(llama_base, tmp_path):
    reference = make_adapter(llama_base, tmp_path / "adapter", use_rslora=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    merge(llama_base, tmp_path / "adapter", tmp_path / "merged")
    assert_bitwise_equal(tmp_path / "merged", reference)
    # and the scale really is alpha / sqrt(r): a merge with alpha / r would differ
    plain = make_adapter(llama_base, tmp_path / "plain")
    assert not torch.equal(
        read_weights(tmp_path / "merged")["model.layers.0.self_attn.q_proj.weight"],
        plain.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


def test_rank_and_alpha_patterns_are_honoured(llama_base, tmp_path):
    reference = make_adapter(
        llama_base,
        tmp_path / "adapter",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 32, "o_proj": 3},
    )
    merge(llama_base, tmp_path / "adapter", tmp_path / "merged")
    assert_bitwise_equal(tmp_path / "merged", reference)


def test_fused_phi3_projections_are_bitwise_equal_to_peft(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = build_base(tmp_path / "base", Phi3ForCausalLM, config)
    assert len(list(base.glob("*.safetensors"))) >= 2
    names = read_weights(base)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    reference = make_adapter(base, tmp_path / "adapter", target_modules=PHI3_TARGETS)

    stats = merge(base, tmp_path / "adapter", tmp_path / "merged")

    assert stats["merged_modules"] == config.num_hidden_layers * len(PHI3_TARGETS)
    assert_changed(base, tmp_path / "merged", PHI3_TARGETS)
    assert_bitwise_equal(tmp_path / "merged", reference)


@pytest.mark.parametrize(
    "autocast_adapter_dtype",
    [True, False],
    ids=["fp32-adapter", "bf16-adapter"],  # peft's default upcasts the adapter of a bf16 base to fp32
)
def test_bf16_base_is_bitwise_equal_to_peft_cpu_merge(tmp_path, autocast_adapter_dtype):
    """Exactly equal (torch.equal), not merely within bf16 rounding: the delta is computed in fp32 like
    peft's CPU path, rounded to the adapter's dtype when that is bf16, and added with a single rounding."""
    base = build_base(tmp_path / "base", dtype=torch.bfloat16)
    reference = make_adapter(
        base, tmp_path / "adapter", dtype=torch.bfloat16, autocast_adapter_dtype=autocast_adapter_dtype
    )
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected_dtype = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    assert {t.dtype for t in adapter.values()} == {expected_dtype}

    merge(base, tmp_path / "adapter", tmp_path / "merged")

    merged = read_weights(tmp_path / "merged")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert_changed(base, tmp_path / "merged", LLAMA_TARGETS)
    assert_bitwise_equal(tmp_path / "merged", reference)


def test_output_dtype_setting_casts_after_merging(llama_base, tmp_path):
    reference = make_adapter(llama_base, tmp_path / "adapter")
    merge(llama_base, tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16")
    merged = read_weights(tmp_path / "merged")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(merged[name], tensor.to(torch.bfloat16)), name


# ---------------------------------------------------------------- refusals


def test_dora_adapter_is_refused(llama_base, tmp_path):
    make_adapter(llama_base, tmp_path / "adapter", use_dora=True)
    with pytest.raises(FtdError, match="DoRA"):
        merge(llama_base, tmp_path / "adapter", tmp_path / "merged")


def test_modules_to_save_adapter_is_refused(llama_base, tmp_path):
    make_adapter(llama_base, tmp_path / "adapter", modules_to_save=["lm_head"])
    with pytest.raises(FtdError, match="modules_to_save"):
        merge(llama_base, tmp_path / "adapter", tmp_path / "merged")


def test_adapter_for_missing_module_is_refused(llama_base, tmp_path):
    make_adapter(llama_base, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({key.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qx_proj"): t for key, t in tensors.items()},
              path)  # fmt: skip
    with pytest.raises(FtdError, match=r"does not have: .*model\.layers\.1\.self_attn\.qx_proj"):
        merge(llama_base, tmp_path / "adapter", tmp_path / "merged")


def test_adapter_from_differently_shaped_base_is_refused(llama_base, tmp_path):
    other = build_base(tmp_path / "other", config=LlamaConfig(**{**LLAMA, "hidden_size": 48}))
    make_adapter(other, tmp_path / "adapter")
    # e.g. "adapter module model.layers.0.self_attn.k_proj: update shape (24, 48) does not fit the base weight (16, 32)"
    with pytest.raises(FtdError, match=r"model\.layers\.\d+\.\S+_proj: update shape \(\d+, 48\) does not fit the base "
                                       r"weight \(\d+, 32\); was the adapter trained on another base model"):  # fmt: skip
        merge(llama_base, tmp_path / "adapter", tmp_path / "merged")


# ---------------------------------------------------------------- legacy pickle adapters


def test_legacy_bin_adapter_merges_identically(llama_base, tmp_path):
    reference = make_adapter(llama_base, tmp_path / "adapter")
    st = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(st), tmp_path / "adapter" / "adapter_model.bin")
    st.unlink()
    merge(llama_base, tmp_path / "adapter", tmp_path / "merged")
    assert_bitwise_equal(tmp_path / "merged", reference)


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_adapter_is_refused_without_running_code(llama_base, tmp_path):
    make_adapter(llama_base, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    marker = tmp_path / "pwned"
    torch.save({key: Payload(f"touch {shlex.quote(str(marker))}")}, tmp_path / "adapter" / "adapter_model.bin")

    # control: the payload is live when the file is unpickled unsafely
    control = tmp_path / "control"
    torch.save({key: Payload(f"touch {shlex.quote(str(control))}")}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    with pytest.raises(FtdError, match="adapter_model.bin: refused: not a plain tensor file"):
        merge(llama_base, tmp_path / "adapter", tmp_path / "merged")
    assert not marker.exists()


def test_without_kernel_copies_the_merge_is_the_same(llama_base, tmp_path, monkeypatch):
    """Untouched tensors are copied file to file by the kernel; where copy_file_range is missing
    (another OS, some filesystem pairs) the by-hand fallback writes the same bytes."""
    import os

    reference = make_adapter(llama_base, tmp_path / "adapter")
    merge(llama_base, tmp_path / "adapter", tmp_path / "kernel")

    def unsupported(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    merge(llama_base, tmp_path / "adapter", tmp_path / "by-hand")
    for shard in sorted((tmp_path / "kernel").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "by-hand" / shard.name).read_bytes()
    assert_bitwise_equal(tmp_path / "by-hand", reference)
