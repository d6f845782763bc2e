"""Loading models and tokenizers the same way in every stage (one place decides dtype,
trust_remote_code and the chat template)."""

from __future__ import annotations

from pathlib import Path


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(path: Path, trust_remote_code: bool = False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, trust_remote_code: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32, low_cpu_mem_usage=True
    )
    return model


def stored_dtype(path: Path) -> str:
    """The dtype a checkpoint's weights are stored in, as its config.json records it (float32 if unsaid)."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def load_fp32_compute_model(path: Path, trust_remote_code: bool = False):
    """A model whose weights stay in their stored dtype (bf16: half of fp32's memory) and whose
    arithmetic is fp32, exactly as an fp32 copy's would be.

    Why: a 7B bf16 checkpoint is 13.5 GB, its fp32 copy 27 GB. Upcasting bf16/fp16 to fp32 is
    exact, so a Linear that upcasts its weight at each call computes the very numbers the fp32
    model computes, holding one layer's fp32 copy at a time. Embeddings look up in the stored
    dtype and upcast the rows they return (exact too); small parameters (norms, biases) become
    fp32 for good. A float32 checkpoint is loaded as it is."""
    import torch

    stored = stored_dtype(path)
    if stored == "float32":
        return load_model(path, trust_remote_code)
    model = load_model(path, trust_remote_code, getattr(torch, stored))
    upcast_compute(model)
    return model


def upcast_compute(model) -> None:
    """Make every low-precision Linear, Embedding and small parameter of `model` compute in fp32
    (see load_fp32_compute_model); LoRA layers added later by peft are fp32 already."""
    import torch
    from torch.nn.utils import parametrize

    class ToFloat32(torch.nn.Module):
        def forward(self, stored):
            return stored.to(torch.float32)

    def embedding_output_fp32(module, args, output):
        return output.to(torch.float32)

    low = (torch.bfloat16, torch.float16)
    stored = set()  # the low-precision tensors kept as they are
    for module in list(model.modules()):
        if isinstance(module, torch.nn.Linear) and module.weight.dtype in low:
            stored.add(id(module.weight))
            parametrize.register_parametrization(module, "weight", ToFloat32(), unsafe=True)
        elif isinstance(module, torch.nn.Embedding) and module.weight.dtype in low:
            stored.add(id(module.weight))
            module.register_forward_hook(embedding_output_fp32)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dtype in low and id(param) not in stored:
                param.data = param.data.to(torch.float32)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype in low:
                setattr(module, name, buffer.to(torch.float32))


def eos_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's."""
    import json

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)
