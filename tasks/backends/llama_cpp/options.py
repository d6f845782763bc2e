"""llama.cpp target options and precisions (shared by the backend, its stages and its runtime)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ftd.config import TargetConfig
from ftd.errors import ConfigError
from tasks.backends.base import parse_options

NAME = "llama_cpp"
# What the converter writes directly, and what llama_model_quantize makes from a lossless GGUF.
CONVERTED = ("f32", "f16", "bf16", "q8_0")
QUANTIZED = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17}  # llama_ftype values (llama.h: LLAMA_FTYPE_MOSTLY_*)
PRECISIONS = (*CONVERTED, *QUANTIZED)
ALIASES = {"fp32": "f32", "fp16": "f16"}  # ftd's names for the two float types
# HF architectures whose llama.cpp conversion and runtime ftd has checked (conversion/*.py has more).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3"}  # fmt: skip


class LlamaCppOptions(BaseModel):
    """`targets[].options` for backend llama_cpp."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_cache_type: Literal["f32", "f16", "q8_0"] | None = Field(
        None, description="KV cache type for the gate and the server command; default f32 for f32 weights, else f16."
    )
    n_threads: int = Field(0, ge=0, description="Decode threads; 0 = every core.")
    n_ctx: int | None = Field(None, gt=0, description="Context length; default: the model's max positions.")
    lora_type: Literal["f32", "f16", "q8_0"] = Field("f32", description="multi_lora: the adapters' GGUF type.")
    pre_tokenizer: str = Field(
        "gpt-2",
        description="Used only when llama.cpp does not recognise the tokenizer's BPE pre-tokenizer; the "
        "conversion then checks llama.cpp's tokenisation against the HF tokenizer's and fails if they differ.",
    )


def options_of(target: TargetConfig) -> LlamaCppOptions:
    return parse_options(target, LlamaCppOptions)


def precision_of(target: TargetConfig) -> str:
    precision = ALIASES.get(target.precision, target.precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"targets.{target.name}.precision: llama_cpp builds {', '.join(PRECISIONS)} (or fp32/fp16), "
            f"not {target.precision!r}"
        )
    return precision


def kv_cache_type(target: TargetConfig) -> str:
    chosen = options_of(target).kv_cache_type
    return chosen or ("f32" if precision_of(target) == "f32" else "f16")
