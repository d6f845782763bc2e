"""The builtin tiny base models (ftd/builtin_models.py): deterministic bytes, the architecture
features each one exists to cover, and their configs pass `ftd validate`.

The full chain (SFT, merge, og build, parity gate) per builtin is the end-to-end test's job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from ftd.builtin_models import ARCHITECTURES, BUILTINS, build_tiny_model, make_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny-llama": "tiny-llama.yaml", "tiny-qwen2": "tiny-qwen2.yaml", "tiny-phi3": "tiny-phi3.yaml"}
DETERMINISTIC_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every builtin built twice, into two separate directories."""
    dirs = {}
    for name in BUILTINS:
        first, second = (tmp_path_factory.mktemp(f"{name}-{i}") for i in (1, 2))
        build_tiny_model(name, first)
        build_tiny_model(name, second)
        dirs[name] = (first, second)
    return dirs


def tensor_names(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def read_tensor(model_dir: Path, name: str):
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


def test_every_builtin_has_a_config_and_a_known_architecture():
    assert set(CONFIGS) == set(BUILTINS)
    for recipe in BUILTINS.values():
        assert recipe.architecture in ARCHITECTURES


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builds_identical_bytes_twice(built, name):
    first, second = built[name]
    for file in DETERMINISTIC_FILES:
        assert (first / file).read_bytes() == (second / file).read_bytes(), f"{name}: {file} differs between builds"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_config_matches_recipe(built, name):
    recipe = BUILTINS[name]
    config = json.loads((built[name][0] / "config.json").read_text())
    assert config["architectures"] == [recipe.architecture]
    assert config["hidden_size"] == recipe.hidden_size == 64
    assert config["num_hidden_layers"] == recipe.num_hidden_layers == 2
    tokenizer = json.loads((built[name][0] / "tokenizer.json").read_text())
    vocab = len(tokenizer["model"]["vocab"])  # special tokens are part of the trained vocabulary
    assert config["vocab_size"] == vocab
    assert config["pad_token_id"] == tokenizer["model"]["vocab"]["<pad>"]
    assert config["eos_token_id"] == tokenizer["model"]["vocab"]["</s>"]


def test_tiny_llama_layout(built):
    names = tensor_names(built["tiny-llama"][0])
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight", "lm_head.weight"} <= names
    assert not any(n.endswith(".bias") for n in names)


def test_tiny_qwen2_has_qkv_biases_and_tied_embeddings(built):
    model_dir = built["tiny-qwen2"][0]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True
    assert config["sliding_window"] is None
    names = tensor_names(model_dir)
    assert "lm_head.weight" not in names  # tied: stored once, as the input embedding
    assert "model.embed_tokens.weight" in names
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = read_tensor(model_dir, f"model.layers.{layer}.self_attn.{proj}.bias")
            assert bias.abs().max() > 0, f"{proj} bias is zero: a dropped bias would go unnoticed"
        assert f"model.layers.{layer}.self_attn.o_proj.bias" not in names


def test_tiny_phi3_has_fused_projections_and_plain_rope(built):
    model_dir = built["tiny-phi3"][0]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "phi3"
    # equal lengths and no rope_scaling: the og builder's Phi3MiniModel, not the LongRoPE variant
    assert config["original_max_position_embeddings"] == config["max_position_embeddings"]
    assert config["rope_scaling"] is None
    assert config["sliding_window"] is None
    assert config["tie_word_embeddings"] is False
    names = tensor_names(model_dir)
    for layer in range(2):
        assert f"model.layers.{layer}.self_attn.qkv_proj.weight" in names
        assert f"model.layers.{layer}.mlp.gate_up_proj.weight" in names
    assert not any(part in n for n in names for part in (".q_proj.", ".gate_proj.", ".up_proj."))
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    qkv = read_tensor(model_dir, "model.layers.0.self_attn.qkv_proj.weight")
    assert tuple(qkv.shape) == (hidden + 2 * kv_heads * hidden // heads, hidden)
    gate_up = read_tensor(model_dir, "model.layers.0.mlp.gate_up_proj.weight")
    assert tuple(gate_up.shape) == (2 * config["intermediate_size"], hidden)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_placeholder_config_has_the_built_modules(built, name):
    """Preflight checks target modules against `make_config(recipe)` (no tokenizer, nothing built):
    it must describe the same architecture and module names as the built model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def linear_modules(config) -> set[str]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    recipe = BUILTINS[name]
    placeholder = make_config(recipe)
    real = AutoConfig.from_pretrained(built[name][0])
    assert placeholder.architectures == real.architectures == [recipe.architecture]
    assert placeholder.tie_word_embeddings == real.tie_word_embeddings == recipe.tie_word_embeddings
    assert linear_modules(placeholder) == linear_modules(real)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-phi3"])
def test_ftd_validate_accepts_config(tmp_path, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    config = ROOT / "configs" / CONFIGS[name]
    argv = [sys.executable, "-m", "app.cli", "validate", str(config), "--set", f"artifacts_dir={tmp_path / 'art'}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"base builtin:{name} ({BUILTINS[name].architecture})" in proc.stdout
