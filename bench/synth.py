"""Synthetic checkpoints and adapters, written tensor by tensor (never the whole model in memory)."""

from __future__ import annotations

import json
import math
from pathlib import Path

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int | None = None,
                 max_positions: int = 512, **extra):  # fmt: skip
    """A Llama config; `extra` sets any other LlamaConfig field (rope, tied embeddings) for real shapes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **(
            {
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 3,
                "architectures": ["LlamaForCausalLM"],
            }
            | extra
        ),  # fmt: skip
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
    )


def llama_3_2_1b_config(max_positions: int = 131072):
    """Llama-3.2-1B's shape (1.24B parameters: 16 layers, 2048 wide, GQA 32/8 heads, 128256-token
    vocabulary, tied embeddings, llama3 rope), as in its hub config.json."""
    return llama_config(
        2048, 8192, 16, 128256, 32, 8, max_positions, tie_word_embeddings=True, rope_theta=500000.0, head_dim=64,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip


def qwen2_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_positions: int):
    """A Qwen2 config as the hub's Qwen2/2.5 models have it: 151936-token vocabulary, tied
    embeddings, q/k/v biases, rope_theta 1e6, no sliding window."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=151936, max_position_embeddings=max_positions,
        tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, architectures=["Qwen2ForCausalLM"],
    )  # fmt: skip


# The real shapes the scale benchmark deploys (hub config.json values; weights random, bf16, sharded).
REAL_SHAPES = {
    # the decode benchmark's medium model (60M parameters: 8 layers, 512 wide, 8 heads of 64), the
    # builtins' scale where fixed costs dominate
    "llama-60m": lambda: llama_config(512, 1536, 8, 32000, 8, 8, 2048),
    # Qwen2.5-0.5B: 494M parameters, 24 layers, 896 wide, GQA 14/2 heads of 64
    "qwen2.5-0.5b": lambda: qwen2_config(896, 4864, 24, 14, 2, 32768),
    # Qwen2-1.5B: 1.54B parameters, 28 layers, 1536 wide, GQA 12/2 heads of 128
    "qwen2-1.5b": lambda: qwen2_config(1536, 8960, 28, 12, 2, 32768),
    # Llama-2-7B: 6.74B parameters, 32 layers, 4096 wide, 32 heads of 128, 32000-token vocabulary
    "llama-2-7b": lambda: llama_config(4096, 11008, 32, 32000, 32, 32, 4096, rms_norm_eps=1e-5),
}


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes in checkpoint order, from a meta-device model (no memory).

    A tied weight is stored once, as the hub stores it (Llama-3.2-1B has no `lm_head.weight`): a
    state_dict lists it under both names, and a separate random `lm_head` in a tied model is not
    what transformers loads (found by the GPU check: peft's merge showed the tied copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = dict(model.named_parameters())  # drops the second name of a tied parameter
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name in unique or name not in every}


def checkpoint_bytes(config, element_bytes: int = 4) -> int:
    return sum(math.prod(s) * element_bytes for s in shapes_of(config).values())


def write_checkpoint(out: Path, config, shard_bytes: int, seed: int = 0, dtype: str = "float32") -> dict:
    """Safetensors shards (fp32, or `dtype` as the hub stores it, e.g. bfloat16) of about
    `shard_bytes` each plus an index; cheap pseudo-random fills (a 16 MiB random pool, tiled with a
    per-tensor offset and scale)."""
    import torch
    from safetensors.torch import save_file

    stored = getattr(torch, dtype)
    element = torch.empty(0, dtype=stored).element_size()
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype  # recorded in config.json, as the hub records it
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=gen) * 0.02
    shapes = shapes_of(config)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * element
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for i, name in enumerate(names):
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=stored)
                continue
            n = math.prod(shape)
            flat = torch.empty(n)
            offset = (index * 7919 + i * 104729) % pool.numel()
            rolled = torch.roll(pool, offset) * (1.0 + 0.01 * i)
            for start in range(0, n, pool.numel()):
                stop = min(n, start + pool.numel())
                flat[start:stop] = rolled[: stop - start]
            tensors[name] = flat.view(shape).to(stored)
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        total += sum(t.numel() * element for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes": total, "shards": len(groups), "parameters": total // element}


def write_adapter(out: Path, config, r: int = 16, alpha: int = 32, seed: int = 1, std: float = 0.02) -> dict:
    """A peft LoRA adapter (all 7 projections) with random, non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(skeleton, lora)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            tensors[name.replace(".default", "")] = torch.randn(param.shape, generator=gen) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_model.peft_config["default"].base_model_name_or_path = None
    peft_model.peft_config["default"].save_pretrained(out)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * 4 for t in tensors.values())}


def write_decode_model(out: Path, config, seed: int = 0) -> dict:
    """A small random Llama (transformers' own init) with a BPE tokenizer, for the decode benchmark.
    The tokenizer is smaller than the vocabulary: token ids are fed to every engine directly."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ftd.builtin_models import TinyRecipe, train_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    train_tokenizer(TinyRecipe(architecture="LlamaForCausalLM", vocab_size=512)).save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}
