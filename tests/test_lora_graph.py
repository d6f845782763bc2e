"""LoRA branches on the og builder's base graph (tasks/backends/onnx_genai/lora_graph.py).

The graph checks run the real builder on a builtin tiny base and compare the engine, adapter
active, with peft's own forward pass of base + adapter; the layout checks build the arrays for
hand-written graph inputs, so every case (chunked or block-diagonal q/k/v, mixed ranks, fused HF
modules split or packed, untrained branches, modules the graph lacks) is pinned down exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ftd.builtin_models import build_tiny_model
from ftd.errors import FtdError
from tasks.backends.onnx_genai import lora_graph
from tasks.backends.onnx_genai.multi_lora import write_onnx_adapter
from tasks.merge import LoraPair, read_adapter
from tests.test_merge import LLAMA_TARGETS, PHI3_TARGETS, random_peft


def og_build(base: Path, out: Path, precision: str = "fp32") -> None:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / ".builder-cache")]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def engine_logits(engine: Path, adapter_file: Path, prompt: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(engine))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "a")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "a")
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    return np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)


@pytest.mark.parametrize(
    ("builtin", "modules"),
    [
        ("tiny-llama", ["q_proj", "v_proj", "down_proj"]),  # k has no LoRA: zeros in the packed branch
        ("tiny-llama", LLAMA_TARGETS),  # GQA: q spans two chunks of the k/v width (a Gather)
        ("tiny-llama-mha", LLAMA_TARGETS),  # q, k and v equally wide: no Gather
        ("tiny-phi3", PHI3_TARGETS),  # fused qkv_proj onto the packed MatMul; gate_up_proj split in two
    ],
)
def test_engine_with_adapter_active_answers_like_peft(builtin: str, modules: list[str], tmp_path: Path) -> None:
    base, engine, adapter = tmp_path / "base", tmp_path / "engine", tmp_path / "adapter"
    build_tiny_model(builtin.removesuffix("-mha"), base)
    if builtin.endswith("-mha"):
        _as_multi_head(base)
    og_build(base, engine)
    before = _matmuls(engine / "model.onnx")
    peft_model = random_peft(base, adapter, target_modules=modules, r=4, lora_alpha=8).eval()

    config = json.loads((base / "config.json").read_text())
    specs = lora_graph.add_lora_branches(engine / "model.onnx", config, modules)
    adapter_config, pairs = read_adapter(adapter)
    arrays = lora_graph.adapter_arrays(specs, adapter_config, pairs, "a")
    write_onnx_adapter(arrays, tmp_path / "a.onnx_adapter")

    after = _matmuls(engine / "model.onnx")
    assert [n for n in after if n.endswith(("qkv_proj/MatMul", "qkv_proj/MatMul_Q4"))], "q/k/v stay packed"
    branched = {(s["layer"], s["module"]) for s in specs.values()}
    assert len(after) == len(before) + 2 * len(branched)
    layouts = {s.get("layout", "blocks") for s in specs.values() if s["module"] == "qkv_proj" and s["ab"] == "B"}
    assert layouts == {"blocks" if builtin == "tiny-phi3" else "chunks"}
    gathers = [n.name for n in _nodes(engine / "model.onnx") if n.op_type == "Gather" and "/lora/" in n.name]
    assert len(gathers) == (2 if builtin == "tiny-llama" else 0)  # one per layer where q spans 2 chunks
    prompt = [5, 17, 33, 8, 91, 42]
    with torch.no_grad():
        expected = peft_model(torch.tensor([prompt])).logits[0, -1].numpy()
    got = engine_logits(engine, tmp_path / "a.onnx_adapter", prompt)
    assert np.abs(got - expected).max() < 1e-4
    # a zero adapter gives the base model back: the branches add nothing of their own
    zeros = {name: np.zeros_like(a) for name, a in arrays.items()}
    write_onnx_adapter(zeros, tmp_path / "zero.onnx_adapter")
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(engine_logits(engine, tmp_path / "zero.onnx_adapter", prompt) - base_logits).max() < 1e-4


def _as_multi_head(base: Path) -> None:
    """Rewrite a builtin's weights with as many k/v heads as q heads (same tokenizer and sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(base, safe_serialization=True)


def test_int4_graph_keeps_int4_base_and_fp32_branches(tmp_path: Path) -> None:
    base, engine = tmp_path / "base", tmp_path / "engine"
    build_tiny_model("tiny-llama", base)
    og_build(base, engine, "int4")
    specs = lora_graph.add_lora_branches(engine / "model.onnx", json.loads((base / "config.json").read_text()),
                                         LLAMA_TARGETS)  # fmt: skip
    ops = {n.name: n.op_type for n in _nodes(engine / "model.onnx")}
    assert ops["/model/layers.0/attn/qkv_proj/MatMul_Q4"] == "MatMulNBits"
    assert ops["/model/layers.0/attn/qkv_proj/lora_A/MatMul"] == "MatMul"
    assert {s["dtype"] for s in specs.values()} == {"float32"}
    assert len(specs) == 2 * 5 * 2  # A and B for qkv, o, gate, up, down in each of the 2 layers


def test_graph_without_the_modules_is_refused(tmp_path: Path) -> None:
    base, engine = tmp_path / "base", tmp_path / "engine"
    build_tiny_model("tiny-llama", base)
    og_build(base, engine)
    with pytest.raises(FtdError, match="no MatMul for modules c_attn"):
        lora_graph.add_lora_branches(engine / "model.onnx", json.loads((base / "config.json").read_text()), ["c_attn"])


# ---------------------------------------------------------------- layouts, by hand

Q, KV, HIDDEN, INTER = 8, 4, 8, 12
CONFIG = {"lora_alpha": 8}


def _specs(packed: bool = True, chunks: bool = False) -> dict[str, dict]:
    """Graph inputs for one layer: packed q/k/v (block-diagonal, or chunked; or separate), o_proj,
    separate gate/up."""
    specs = {}
    groups = [("attn", "qkv_proj", HIDDEN, Q + 2 * KV)] if packed else [
        ("attn", "q_proj", HIDDEN, Q), ("attn", "k_proj", HIDDEN, KV), ("attn", "v_proj", HIDDEN, KV)]  # fmt: skip
    groups += [("attn", "o_proj", Q, HIDDEN), ("mlp", "gate_proj", HIDDEN, INTER), ("mlp", "up_proj", HIDDEN, INTER)]
    for block, module, k, n in groups:
        a, b = lora_graph.input_names(0, block, module)
        parts = {"q_proj": [0, Q], "k_proj": [Q, Q + KV], "v_proj": [Q + KV, Q + 2 * KV]} if module == "qkv_proj" else {
            module: [0, n]}  # fmt: skip
        common = {"layer": 0, "block": block, "module": module, "dtype": "float32"}
        specs[a] = {**common, "ab": "A", "features": k}
        specs[b] = {**common, "ab": "B", "features": n, "parts": parts}
        if chunks and module == "qkv_proj":
            specs[b] |= {"layout": "chunks", "chunk": KV}
    return specs


def _pair(block: str, module: str, rank: int, in_features: int, out_features: int, seed: int) -> tuple[str, LoraPair]:
    gen = torch.Generator().manual_seed(seed)
    pair = LoraPair(f"model.layers.0.{'self_attn' if block == 'attn' else 'mlp'}.{module}")
    pair.A, pair.B = torch.randn(rank, in_features, generator=gen), torch.randn(out_features, rank, generator=gen)
    return pair.module, pair


def _delta(arrays: dict, block: str, module: str) -> np.ndarray:
    a, b = lora_graph.input_names(0, block, module)
    return arrays[a] @ arrays[b]


def test_packed_qkv_is_block_diagonal_with_each_projections_rank() -> None:
    pairs = dict([_pair("attn", "q_proj", 4, HIDDEN, Q, 1), _pair("attn", "v_proj", 2, HIDDEN, KV, 2)])
    arrays = lora_graph.adapter_arrays(_specs(), CONFIG, pairs, "a")
    a, b = lora_graph.input_names(0, "attn", "qkv_proj")
    assert arrays[a].shape == (HIDDEN, 6) and arrays[b].shape == (6, Q + 2 * KV)
    delta = _delta(arrays, "attn", "qkv_proj")
    q, v = pairs["model.layers.0.self_attn.q_proj"], pairs["model.layers.0.self_attn.v_proj"]
    np.testing.assert_allclose(delta[:, :Q], (q.B @ q.A).T.numpy() * 8 / 4, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(delta[:, Q : Q + KV], 0)  # k: not trained by this adapter
    np.testing.assert_allclose(delta[:, Q + KV :], (v.B @ v.A).T.numpy() * 8 / 2, rtol=1e-5, atol=1e-6)
    for module in ("o_proj", "gate_proj", "up_proj"):  # untrained branches: rank-1 zeros
        a, b = lora_graph.input_names(0, "attn" if module == "o_proj" else "mlp", module)
        assert arrays[a].shape[1] == 1 and not arrays[a].any() and not arrays[b].any()


def test_packed_qkv_chunks_hold_each_projections_rows_only() -> None:
    """The chunked layout, applied as the graph does (x·A -> 3 groups -> each chunk's group · its B
    block), gives each projection's own update; ranks 4 (q) and 2 (v) pad to 4, k untrained."""
    pairs = dict([_pair("attn", "q_proj", 4, HIDDEN, Q, 1), _pair("attn", "v_proj", 2, HIDDEN, KV, 2)])
    arrays = lora_graph.adapter_arrays(_specs(chunks=True), CONFIG, pairs, "a")
    a, b = lora_graph.input_names(0, "attn", "qkv_proj")
    chunks = (Q + 2 * KV) // KV
    assert arrays[a].shape == (HIDDEN, 3 * 4) and arrays[b].shape == (chunks, 4, KV)  # no zero blocks
    groups = arrays[a].reshape(HIDDEN, 3, 4)[:, [0] * (Q // KV) + [1, 2]]  # what Reshape + Gather compute
    delta = np.einsum("igr,grw->igw", groups, arrays[b]).reshape(HIDDEN, -1)
    q, v = pairs["model.layers.0.self_attn.q_proj"], pairs["model.layers.0.self_attn.v_proj"]
    np.testing.assert_allclose(delta[:, :Q], (q.B @ q.A).T.numpy() * 8 / 4, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(delta[:, Q : Q + KV], 0)
    np.testing.assert_allclose(delta[:, Q + KV :], (v.B @ v.A).T.numpy() * 8 / 2, rtol=1e-5, atol=1e-6)
    untrained = lora_graph.adapter_arrays(
        _specs(chunks=True), CONFIG, dict([_pair("attn", "o_proj", 2, Q, HIDDEN, 3)]), "b"
    )
    assert untrained[a].shape == (HIDDEN, 3) and untrained[b].shape == (chunks, 1, KV) and not untrained[b].any()


@pytest.mark.parametrize("packed", [True, False])
def test_fused_hf_modules_land_on_the_graphs_projections(packed: bool) -> None:
    qkv, gate_up = "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"
    pairs = dict(
        [_pair("attn", "qkv_proj", 3, HIDDEN, Q + 2 * KV, 1), _pair("mlp", "gate_up_proj", 2, HIDDEN, 2 * INTER, 2)]
    )
    arrays = lora_graph.adapter_arrays(_specs(packed), CONFIG, pairs, "a")
    full_qkv = (pairs[qkv].B @ pairs[qkv].A).T.numpy() * 8 / 3
    if packed:
        np.testing.assert_allclose(_delta(arrays, "attn", "qkv_proj"), full_qkv, rtol=1e-5, atol=1e-6)
    else:
        split = np.concatenate([_delta(arrays, "attn", m) for m in ("q_proj", "k_proj", "v_proj")], axis=1)
        np.testing.assert_allclose(split, full_qkv, rtol=1e-5, atol=1e-6)
    full_gate_up = (pairs[gate_up].B @ pairs[gate_up].A).T.numpy() * 8 / 2
    np.testing.assert_allclose(_delta(arrays, "mlp", "gate_proj"), full_gate_up[:, :INTER], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_delta(arrays, "mlp", "up_proj"), full_gate_up[:, INTER:], rtol=1e-5, atol=1e-6)


def test_module_the_graph_lacks_or_a_wrong_shape_is_refused() -> None:
    pairs = dict([_pair("mlp", "down_proj", 2, INTER, HIDDEN, 1)])  # no down_proj branch in these specs
    with pytest.raises(FtdError, match=r"adapter a: modules \[\(0, 'down_proj'\)\] are not in the multi-LoRA graph"):
        lora_graph.adapter_arrays(_specs(), CONFIG, pairs, "a")
    pairs = dict([_pair("attn", "o_proj", 2, HIDDEN + 1, HIDDEN, 1)])
    with pytest.raises(FtdError, match="takes 9 inputs, the graph's o_proj 8"):
        lora_graph.adapter_arrays(_specs(), CONFIG, pairs, "a")


def _nodes(model_path: Path) -> list:
    import onnx

    return list(onnx.load(str(model_path), load_external_data=False).graph.node)


def _matmuls(model_path: Path) -> list[str]:
    return [n.name for n in _nodes(model_path) if n.op_type in ("MatMul", "MatMulNBits")]
