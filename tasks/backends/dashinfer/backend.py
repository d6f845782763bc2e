"""DashInfer / AllSpark: a real CPU engine for merged models, and a multi-LoRA bundle for DashInfer 2.x.

`mode: merged` serializes the merged model to `.dimodel/.ditensors` with dashinfer 1.3.0 (CPU,
AVX2) and runs the smoke test through DashInfer itself, in its own environment
(tasks/backends/dashinfer/env.py), so the parity gate covers it like any other engine. DashInfer does not
expose logits, so its gate is greedy-token agreement and accuracy.

`mode: multi_lora` writes what DashInfer 2.x (CUDA) needs to serve every adapter by `lora_name`
(tasks/backends/dashinfer/lora_bundle.py); running it needs an NVIDIA GPU and CPython ≤ 3.10, so that
step is skipped here with the reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import ConfigError
from ftd.orchestration import stage_task
from tasks.backends.base import AdapterChain, Backend, DeployContext, Deployment, Status, gpu_unavailable_reason
from tasks.backends.dashinfer import env, lora_bundle
from tasks.backends.dashinfer.options import DATA_TYPES, MODEL_NAME, MODEL_TYPES, NAME, DashInferOptions, options_of
from tasks.backends.runtime import Generation
from tasks.backends.shape import ModelShape, check_grouped_heads, refuse


class DashInfer(Backend):
    name = NAME
    modes = ("merged", "multi_lora")
    libraries = ("safetensors", "torch", "peft")
    options_schema = DashInferOptions

    def check(self, target: TargetConfig, architecture: str) -> None:
        options_of(target)
        if architecture not in MODEL_TYPES:
            raise ConfigError(
                f"targets.{target.name}: DashInfer serves {', '.join(sorted(MODEL_TYPES))} through ftd, not {architecture}"
            )
        if target.mode == "merged" and (target.precision, target.device) != ("fp32", "cpu"):
            raise ConfigError(
                f"targets.{target.name}: the DashInfer CPU engine is built as precision fp32, device cpu "
                f"(got {target.precision}/{target.device})"
            )
        if target.mode == "multi_lora" and (target.precision not in ("fp16", "bf16") or target.device != "cuda"):
            raise ConfigError(
                f"targets.{target.name}: DashInfer multi-LoRA runs on CUDA: set device: cuda and precision fp16 or bf16"
            )

    def check_model(self, target: TargetConfig, model_config: dict) -> None:
        """What DashInfer 1.3.0's CPU graph would serve wrongly without an error: its LLaMA_v2 graph
        never passes rope_theta to the rotary op (its default base is 10000: rotary_op.cpp), no
        model type has a form for rope_scaling or a sliding window, LLaMA_v2's GEMMs have no
        biases (llama_v2.py), and its grouped-query rotary derives the head size as hidden / heads."""
        if target.mode != "merged":
            return
        shape, engine = ModelShape.of(model_config), "DashInfer 1.3.0"
        if shape is None:
            return
        architecture = (model_config.get("architectures") or [""])[0]
        check_grouped_heads(target, engine, shape)
        if shape.rope_scaling:
            raise refuse(target, engine, "has no RoPE scaling", f"scales RoPE ({shape.rope_type})")
        if architecture == "LlamaForCausalLM" and float(shape.rope_theta or 10000.0) != 10000.0:
            raise refuse(target, engine, "rotates Llama heads with base 10000 whatever rope_theta says",
                         f"has rope_theta {shape.rope_theta}")  # fmt: skip
        if architecture == "LlamaForCausalLM" and (model_config.get("attention_bias") or model_config.get("mlp_bias")):
            raise refuse(target, engine, "builds Llama projections without biases", "has attention or MLP biases")
        if shape.head_dim * shape.heads != shape.hidden:
            raise refuse(target, engine, "needs head_dim = hidden_size / num_attention_heads",
                         f"has head_dim {shape.head_dim} with {shape.heads} heads of a {shape.hidden}-wide model")  # fmt: skip
        if model_config.get("use_sliding_window"):
            raise refuse(target, engine, "has no sliding-window attention", "sets use_sliding_window")

    def check_adapters(self, target: TargetConfig, adapters: list[dict]) -> None:
        """DashInfer 2.x rejects more adapters than lora_max_num and ranks above lora_max_rank."""
        if target.mode != "multi_lora":
            return
        options = options_of(target)
        for adapter in adapters:
            if options.lora_max_rank is not None and adapter["max_rank"] > options.lora_max_rank:
                raise ConfigError(
                    f"targets.{target.name}.options.lora_max_rank: {options.lora_max_rank} is below adapter "
                    f"{adapter['name']}'s rank {adapter['max_rank']}; raise it or remove the option"
                )
        if options.lora_max_num is not None and options.lora_max_num < len(adapters):
            raise ConfigError(
                f"targets.{target.name}.options.lora_max_num: {options.lora_max_num} < {len(adapters)} adapters; "
                "DashInfer would refuse to load the rest: raise it or remove the option"
            )

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        if target.mode == "multi_lora":
            # ftd runs no DashInfer 2.x engine (its CUDA wheels are for CPython <= 3.10): with or
            # without a GPU this step is skipped, and the reason says which of the two is missing.
            reason = gpu_unavailable_reason(
                "DashInfer multi-LoRA", ["dashinfer 2.x (CUDA wheels for CPython <= 3.10; ftd does not install it)"]
            )
            return f"{reason}; the bundle and its launch script are written, the engine is not run here"
        return env.platform_problem()

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        spec = {"model_dir": str(merged_dir), "out_dir": str(out), "name": MODEL_NAME,
                "model_type": MODEL_TYPES[_architecture(merged_dir)], "data_type": DATA_TYPES[target.precision],
                "result": str(out / ".serialize.json")}  # fmt: skip
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "serialize.json"
            spec_path.write_text(json.dumps(spec))
            log = env.run_worker("serialize", spec_path)
        (out / "build.log").write_text(log)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
            if (merged_dir / name).is_file():
                shutil.copy2(merged_dir / name, out / name)
        result = json.loads((out / ".serialize.json").read_text())
        (out / ".serialize.json").unlink()
        return {
            "build_seconds": round(time.perf_counter() - started, 2),
            "dashinfer": "1.3.0",
            "model_type": spec["model_type"],
            "files": sorted(p.name for p in out.iterdir() if p.suffix in (".dimodel", ".ditensors")),
            "environment": str(env.env_dir()),
            **result,
        }

    def deploy(self, ctx: DeployContext, target: TargetConfig, adapters: list[AdapterChain]) -> list[Deployment]:
        if target.mode == "merged":
            return super().deploy(ctx, target, adapters)
        # multi_lora: the DashInfer 2.x bundle is written and checked here; serving it needs a GPU
        bundle = ctx.run(lora_task, target.name, base=ctx.base, adapters=[a.adapter for a in adapters], target=target)
        reason = self.unavailable_reason(target) or "no automated DashInfer 2.x smoke test yet: run launch_dashinfer.py"
        return [Deployment(target, a.name, bundle, Status.VERIFIED_ONLY, reason) for a in adapters]

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None) -> DashInferEngine:
        return DashInferEngine(engine_dir, options_of(target).num_threads)


def _architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("architectures") or ["?"])[0]


class DashInferEngine:
    """Greedy decoding through DashInfer on CPU. The engine lives in another environment, so every
    prompt of a smoke test is decoded in one worker call (one engine load)."""

    def __init__(self, engine_dir: Path, num_threads: int = 0):
        self.engine_dir = engine_dir
        self.num_threads = num_threads

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        return self.greedy_batch([prompt_ids], max_new_tokens, eos_ids)[0]

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[Generation]:
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "generate.json"
            result_path = Path(tmp) / "result.json"
            spec_path.write_text(json.dumps({
                "engine_dir": str(self.engine_dir), "name": MODEL_NAME, "prompts": prompts,
                "max_new_tokens": max_new_tokens, "eos_ids": eos_ids, "num_threads": self.num_threads,
                "result": str(result_path),
            }))  # fmt: skip
            env.run_worker("generate", spec_path)
            tokens = json.loads(result_path.read_text())["tokens"]
        return [Generation(tokens=t, logits=None) for t in tokens]


lora_task = stage_task(lora_bundle.assemble, lora_bundle.STAGE, lora_bundle.bundle_key, "dashinfer-lora[{target.name}]")
BACKEND = DashInfer()
