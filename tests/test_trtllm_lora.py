"""PEFT → TensorRT-LLM LoRA conversion (tasks/backends/tensorrt_llm/lora.py), checked against peft itself.

For every layer and module, the update the engine would apply — read back out of the converted
`lora_weights` row by TensorRT-LLM's documented layout — must equal peft's own `get_delta_weight`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from ftd.errors import FtdError
from tasks.backends.tensorrt_llm import lora as trt
from tests.test_merge import LLAMA, PHI3_TARGETS, build_base, random_peft

PHI3 = dict(LLAMA, pad_token_id=0)


def make_peft(base_dir: Path, out: Path, **lora) -> torch.nn.Module:
    """Save a random, non-trivial adapter; return the live peft model for ΔW comparisons."""
    return random_peft(base_dir, out, seed=3, **lora)


def peft_deltas(peft_model) -> dict[tuple[int, str], np.ndarray]:
    """(layer, hf module) → peft's ΔW [out, in], scale included."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = module.get_delta_weight("default").detach().float().numpy()
    return out


def engine_deltas(converted: trt.TrtLora, dims: dict) -> dict[tuple[int, str], np.ndarray]:
    out = {}
    for row, (module_id, layer, rank), source in zip(converted.weights, converted.config, converted.sources):
        name = trt.MODULE_NAMES[int(module_id)]
        in_dim, out_dim = dims[name]
        out[(int(layer), source.rsplit(".", 1)[-1])] = trt.delta_weight(row, int(rank), in_dim, out_dim)
    return out


def llama_dims(config=LLAMA) -> dict:
    return trt.module_dims(config)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("trt") / "base")


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True, "r": 8, "lora_alpha": 4},
        {"r": 4, "rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 32}},
    ],
    ids=["plain", "rslora", "rank-and-alpha-patterns"],
)
def test_every_delta_equals_peft(llama_base: Path, tmp_path: Path, lora: dict):
    peft_model = make_peft(llama_base, tmp_path / "adapter", **lora)
    converted = trt.convert("a", tmp_path / "adapter", "fp32")
    ours, theirs = engine_deltas(converted, llama_dims()), peft_deltas(peft_model)
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7
    for key, expected in theirs.items():
        np.testing.assert_allclose(ours[key], expected, rtol=1e-5, atol=1e-6, err_msg=str(key))
    # each row says its own rank, and the padding after r·(in+out) is zero
    for row, (module_id, _layer, rank) in zip(converted.weights, converted.config):
        in_dim, out_dim = llama_dims()[trt.MODULE_NAMES[int(module_id)]]
        assert not row[rank * (in_dim + out_dim) :].any()
    assert converted.weights.shape == (14, max(r * (i + o) for (_, _, r), (i, o) in _row_dims(converted)))


def _row_dims(converted):
    dims = llama_dims()
    return [((m, layer, r), dims[trt.MODULE_NAMES[int(m)]]) for m, layer, r in converted.config]


def test_module_mapping_follows_tensorrt_llm(llama_base: Path, tmp_path: Path):
    """gate_proj is TensorRT-LLM's mlp_h_to_4h and up_proj its mlp_gate (not the other way round)."""
    make_peft(llama_base, tmp_path / "adapter", target_modules=["gate_proj", "up_proj"])
    converted = trt.convert("a", tmp_path / "adapter", "fp32")
    by_source = {
        s.rsplit(".", 1)[-1]: trt.MODULE_NAMES[int(m)] for s, m in zip(converted.sources, converted.config[:, 0])
    }
    assert by_source == {"gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate"}
    assert converted.config[:, 0].tolist().count(5) == 2 and converted.config[:, 0].tolist().count(7) == 2


def test_fused_phi3_gate_up_is_stored_with_halves_swapped(tmp_path: Path):
    base = build_base(tmp_path / "phi3", Phi3ForCausalLM, Phi3Config(**PHI3))
    peft_model = make_peft(base, tmp_path / "adapter", target_modules=PHI3_TARGETS)
    converted = trt.convert("a", tmp_path / "adapter", "fp32")
    ours, theirs = engine_deltas(converted, trt.fused_mlp_dims(PHI3)), peft_deltas(peft_model)
    half = PHI3["intermediate_size"]
    for (layer, module), expected in theirs.items():
        if module == "gate_up_proj":
            expected = np.concatenate([expected[half:], expected[:half]])
        np.testing.assert_allclose(ours[(layer, module)], expected, rtol=1e-5, atol=1e-6)
    assert {trt.MODULE_NAMES[int(m)] for m in converted.config[:, 0]} == {
        "attn_qkv", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h"}  # fmt: skip


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_store_that_dtype_rounded_like_torch(llama_base: Path, tmp_path: Path, precision: str):
    peft_model = make_peft(llama_base, tmp_path / "adapter")
    full = trt.convert("a", tmp_path / "adapter", "fp32")
    half = trt.convert("a", tmp_path / "adapter", precision)
    assert half.weights.dtype == trt.numpy_dtype(precision) and half.weights.dtype.itemsize == 2
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    expected_bits = torch.from_numpy(full.weights).to(torch_dtype).view(torch.int16).numpy()
    assert np.array_equal(half.weights.view(np.int16), expected_bits)
    eps = {"fp16": 2**-10, "bf16": 2**-7}[precision]
    for key, expected in peft_deltas(peft_model).items():
        got = engine_deltas(half, llama_dims())[key]
        assert np.abs(got - expected).max() <= 4 * eps * np.abs(expected).max(), key


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_files_round_trip(llama_base: Path, tmp_path: Path, precision: str):
    make_peft(llama_base, tmp_path / "adapter", r=2)
    converted = trt.convert("a", tmp_path / "adapter", precision)
    trt.write_npy(converted, tmp_path / "npy")
    trt.write_raw(converted, tmp_path / "w.bin", tmp_path / "c.bin")
    weights = np.load(tmp_path / "npy" / "model.lora_weights.npy")
    config = np.load(tmp_path / "npy" / "model.lora_config.npy")
    assert weights.shape == (1, *converted.weights.shape) and config.shape == (1, converted.rows, 3)
    assert config.dtype == np.int32
    assert weights.view(np.uint8).tobytes() == converted.weights.view(np.uint8).tobytes()
    raw_w = trt.read_raw(tmp_path / "w.bin", precision, converted.weights.shape[1])
    raw_c = trt.read_raw(tmp_path / "c.bin", np.int32, 3)
    assert raw_w.view(np.uint8).tobytes() == converted.weights.view(np.uint8).tobytes()
    assert np.array_equal(raw_c, converted.config)
    assert (tmp_path / "w.bin").stat().st_size == converted.weights.size * converted.weights.dtype.itemsize


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding LoRA"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
    ],
    ids=["lm_head", "embedding", "modules_to_save", "dora"],
)
def test_what_the_format_cannot_carry_is_refused_by_name(llama_base: Path, tmp_path: Path, lora: dict, message: str):
    try:
        make_peft(llama_base, tmp_path / "adapter", **lora)
    except ValueError as exc:  # a peft version that cannot even build this adapter
        pytest.skip(f"peft cannot build {lora}: {exc}")
    with pytest.raises(FtdError, match=message) as info:
        trt.convert("my-adapter", tmp_path / "adapter", "fp16")
    assert "my-adapter" in str(info.value)


def test_trained_biases_are_refused(tmp_path: Path):
    """Qwen2's q/k/v have biases; an adapter that trained them (bias="lora_only") cannot be carried."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = build_base(tmp_path / "qwen2", Qwen2ForCausalLM, Qwen2Config(**LLAMA))
    make_peft(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], bias="lora_only")
    with pytest.raises(FtdError, match="LoRA bias"):
        trt.convert("biased", tmp_path / "adapter", "bf16")
