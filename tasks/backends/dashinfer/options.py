"""DashInfer target options and the model types ftd serializes (shared by the backend and its
multi-LoRA bundle)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ftd.config import TargetConfig
from tasks.backends.base import parse_options

NAME = "dashinfer"
# HF architecture → DashInfer model type (dashinfer/allspark/model/*.py).
MODEL_TYPES = {"LlamaForCausalLM": "LLaMA_v2", "Qwen2ForCausalLM": "Qwen_v20"}
DATA_TYPES = {"fp32": "float32"}
MODEL_NAME = "model"


class DashInferOptions(BaseModel):
    """`targets[].options` for backend dashinfer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_max_num: int | None = Field(None, gt=0, description="multi_lora: adapters loaded at once; default: all.")
    lora_max_rank: int | None = Field(None, gt=0, description="multi_lora: default: the largest adapter rank.")
    max_length: int = Field(2048, gt=0, description="multi_lora: engine max length (prompt + answer).")
    max_batch: int = Field(8, gt=0)
    num_threads: int = Field(0, ge=0, description="merged CPU engine: 0 = all cores.")


def options_of(target: TargetConfig) -> DashInferOptions:
    return parse_options(target, DashInferOptions)
