"""TensorRT-LLM behind Triton: a deployment bundle built and checked on any machine, the engine
built where a GPU and the `tensorrt_llm` package are present.

What is produced (this package): every adapter converted to TensorRT-LLM's LoRA arrays (`lora.py`),
a Triton model repository (inflight-batcher layout, `bundle.py`, `triton.py`) whose `tensorrt_llm`
model warms every adapter up so clients send only `lora_task_id`, the exact engine-build commands
(`options.py`), and a README; `verify.py` checks the bundle on CPU; `stages.py` holds the cached
stages. This module owns what is accepted at config time and the deploy plan.
"""

from __future__ import annotations

import importlib.util

from ftd.config import TargetConfig
from ftd.errors import ConfigError
from tasks.backends.base import AdapterChain, Backend, DeployContext, Deployment, Status, gpu_unavailable_reason
from tasks.backends.tensorrt_llm import stages
from tasks.backends.tensorrt_llm.lora import DTYPES, HF_TO_TRT
from tasks.backends.tensorrt_llm.options import ARCHITECTURES, NAME, TrtLlmOptions, options_of


class TensorRtLlm(Backend):
    name = NAME
    modes = ("multi_lora", "merged")
    libraries = ("tensorrt_llm", "transformers", "safetensors", "tritonclient")
    options_schema = TrtLlmOptions

    def check(self, target: TargetConfig, architecture: str) -> None:
        options = options_of(target)
        if options.lora_delivery == "prefetch" and target.precision == "bf16":
            raise ConfigError(
                f"targets.{target.name}.options.lora_delivery: prefetch reads .npy files, and TensorRT-LLM's .npy "
                "reader has no bfloat16 (numpy writes it as 'V2'); use lora_delivery: warmup for a bf16 engine"
            )
        if target.precision not in DTYPES:
            raise ConfigError(
                f"targets.{target.name}.precision: {target.precision!r} is not a TensorRT-LLM LoRA dtype "
                f"(one of {', '.join(DTYPES)}; the LoRA weights are stored in the engine's dtype)"
            )
        if target.device != "cuda":
            raise ConfigError(
                f"targets.{target.name}.device: TensorRT-LLM engines run on NVIDIA GPUs: set `device: cuda` "
                "(the bundle is still produced and checked on a machine without one)"
            )
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"targets.{target.name}: ftd's TensorRT-LLM backend supports {', '.join(sorted(ARCHITECTURES))}, "
                f"not {architecture}"
            )

    def check_adapters(self, target: TargetConfig, adapters: list[dict]) -> None:
        """What the runtime would reject, caught at config time: ranks above max_lora_rank, modules the
        format cannot carry, more adapters than the cache holds."""
        options = options_of(target)
        if target.mode != "multi_lora":
            return
        for adapter in adapters:
            unsupported = sorted(set(adapter["modules"]) - set(HF_TO_TRT))
            if unsupported:
                raise ConfigError(
                    f"adapters.{adapter['name']}: TensorRT-LLM LoRA cannot carry {unsupported} (it takes "
                    f"{', '.join(sorted(HF_TO_TRT))}); drop them or remove target {target.name}"
                )
            if options.max_lora_rank is not None and adapter["max_rank"] > options.max_lora_rank:
                raise ConfigError(
                    f"targets.{target.name}.options.max_lora_rank: {options.max_lora_rank} is below adapter "
                    f"{adapter['name']}'s rank {adapter['max_rank']}; the runtime would reject it: raise it to "
                    f"{adapter['max_rank']} or remove the option"
                )
        if options.max_loras is not None and options.max_loras < len(adapters):
            raise ConfigError(
                f"targets.{target.name}.options.max_loras: {options.max_loras} < {len(adapters)} adapters; warm-up "
                "would evict adapters from the GPU cache: raise it or remove the option"
            )

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        """Why the *engine* cannot be built here (the bundle always can)."""
        missing = ["the tensorrt_llm package"] if importlib.util.find_spec("tensorrt_llm") is None else []
        return gpu_unavailable_reason("engine build", missing)

    def deploy(self, ctx: DeployContext, target: TargetConfig, adapters: list[AdapterChain]) -> list[Deployment]:
        """Adapters converted, engine built where possible, Triton bundle written and verified.

        multi_lora: one bundle over the base model serving every adapter by lora_task_id; merged: one
        bundle per adapter over its merged model. Running the engine needs a GPU and Triton: every
        deployment is verified only (its bundle is registrable), with the reason."""
        if target.mode == "multi_lora":
            loras = [ctx.run(stages.lora_task, f"{a.name}/{target.name}", adapter=a.adapter, target=target)
                     for a in adapters]  # fmt: skip
            plans = [(target.name, ctx.base, adapters, loras)]
        else:
            plans = [(f"{a.name}/{target.name}", a.merged, [a], []) for a in adapters]
        deployments = []
        for label, model, served, loras in plans:
            engine = ctx.run(stages.engine_task, label, model=model, loras=loras, target=target,
                             architecture=ctx.architecture)  # fmt: skip
            bundle = ctx.run(
                stages.bundle_task, label, model=model, tokenizer_from=served[0].adapter,
                adapters=[a.adapter for a in served if loras], loras=loras, engine=engine, target=target,
                architecture=ctx.architecture,
            )  # fmt: skip
            reason = (f"engine not built ({engine.meta['reason']})" if engine.meta.get("skipped")
                      else "no automated TensorRT-LLM smoke test yet: run request.sh against Triton")  # fmt: skip
            deployments += [Deployment(target, a.name, bundle, Status.VERIFIED_ONLY, reason) for a in served]
        return deployments


BACKEND = TensorRtLlm()
