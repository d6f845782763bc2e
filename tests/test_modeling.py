"""The reference arithmetic (tasks.modeling.load_fp32_compute_model): a bf16 checkpoint kept in
bf16 computes bitwise the logits of its fp32 copy, with and without a LoRA adapter on top, for
untied and tied embeddings, at about half the parameter memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.modeling import load_fp32_compute_model, load_model


@pytest.mark.parametrize("tied", [False, True])
def test_stored_dtype_with_fp32_arithmetic_is_bitwise_the_fp32_model(tmp_path: Path, tied: bool) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)  # fmt: skip
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_config(config), lora).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    fp32, kept = load_model(tmp_path / "model"), load_fp32_compute_model(tmp_path / "model")
    assert kept.model.embed_tokens.weight.dtype == torch.bfloat16  # stored as it was
    with torch.no_grad():
        assert torch.equal(fp32(ids).logits, kept(ids).logits)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(kept) < 0.6 * size(fp32)
    fp32, kept = PeftModel.from_pretrained(fp32, tmp_path / "adapter"), PeftModel.from_pretrained(kept, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fp32(ids).logits, kept(ids).logits)
