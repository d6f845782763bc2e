"""TensorRT-LLM target options, the architectures ftd converts, and the engine-build commands
(shared by the backend's checks, its stages and the bundle it writes).

The backend: a deployment bundle built and checked on any machine, the engine
built where a GPU and the `tensorrt_llm` package are present.

What is produced (tasks/backends/tensorrt_llm/): every adapter converted to TensorRT-LLM's LoRA arrays, a Triton
model repository (inflight-batcher layout) whose `tensorrt_llm` model warms every adapter up so
clients send only `lora_task_id`, the exact engine-build commands, and a README. This module owns
the target's options, what is accepted at config time, and the engine build itself.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftd.config import TargetConfig
from tasks.backends.base import parse_options
from tasks.backends.tensorrt_llm.lora import DTYPES

NAME = "tensorrt_llm"
# HF architecture → the tensorrt_llm.models class whose `from_hugging_face` converts it.
ARCHITECTURES = {
    "LlamaForCausalLM": "LLaMAForCausalLM",
    "MistralForCausalLM": "LLaMAForCausalLM",
    "Qwen2ForCausalLM": "QWenForCausalLM",
}
# Where the bundle is mounted inside the Triton container: config.pbtxt paths are absolute.
MOUNT = "/ftd-bundle"


class TrtLlmOptions(BaseModel):
    """`targets[].options` for backend tensorrt_llm."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(8, gt=0)
    max_input_len: int = Field(512, gt=0)
    max_seq_len: int = Field(1024, gt=1)
    max_beam_width: int = Field(1, gt=0)
    max_lora_rank: int | None = Field(None, gt=0, description="Default: the largest adapter rank.")
    max_loras: int | None = Field(None, gt=0, description="Adapters the GPU LoRA cache holds; default: all.")
    lora_delivery: Literal["warmup", "prefetch"] = Field(
        "warmup", description="warmup: model_warmup entries (the seed's way); prefetch: lora_prefetch_dir."
    )
    lora_cache_gpu_memory_fraction: float = Field(0.05, gt=0, lt=1)
    lora_cache_host_memory_bytes: int = Field(1 << 30, gt=0)
    kv_cache_free_gpu_mem_fraction: float = Field(0.9, gt=0, le=1)
    warmup_prompt: str = Field("Hello", min_length=1, description="Tokenized with the experiment's tokenizer.")
    warmup_output_len: int = Field(3, gt=0)
    triton_image: str = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"

    @model_validator(mode="after")
    def _lengths(self) -> TrtLlmOptions:
        if self.max_seq_len <= self.max_input_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must exceed max_input_len ({self.max_input_len})")
        return self


def options_of(target: TargetConfig) -> TrtLlmOptions:
    return parse_options(target, TrtLlmOptions)


def build_commands(
    architecture: str, target: TargetConfig, modules: list[str], max_rank: int, hf_dir: str, ckpt_dir: str,
    engine_dir: str,
) -> list[list[str]]:  # fmt: skip
    """The two steps that make an engine: HF checkpoint → TensorRT-LLM checkpoint (Python API, no
    examples directory needed) → `trtllm-build` with the LoRA plugin and the adapters' modules."""
    options = options_of(target)
    dtype = DTYPES[target.precision]
    convert = (
        f"from tensorrt_llm.models import {ARCHITECTURES[architecture]} as M; "
        f"M.from_hugging_face({json.dumps(hf_dir)}, dtype={json.dumps(dtype)})"
        f".save_checkpoint({json.dumps(ckpt_dir)}, save_config=True)"
    )
    build = [
        "trtllm-build", "--checkpoint_dir", ckpt_dir, "--output_dir", engine_dir, "--gemm_plugin", dtype,
        "--max_batch_size", str(options.max_batch_size), "--max_input_len", str(options.max_input_len),
        "--max_seq_len", str(options.max_seq_len), "--max_beam_width", str(options.max_beam_width),
    ]  # fmt: skip
    if modules:
        build += ["--lora_plugin", dtype, "--lora_target_modules", *modules, "--max_lora_rank", str(max_rank)]
    return [["python3", "-c", convert], build]
