"""llama.cpp / GGUF: the CPU engine people deploy (llama-server, Ollama, LM Studio).

`mode: merged` converts each adapter's merged model to a GGUF; `mode: multi_lora` converts the
base once and each adapter to a LoRA GGUF over it (adding an adapter converts only that one).
Quantised precisions (q4_0, q4_k_m, q5_k_m) are made from the lossless GGUF, which stays cached.
The parity gate runs the bundle through llama.cpp itself, logits included, every adapter of a
multi-LoRA bundle switched on one loaded base. Stages: `convert.py`, the bundle (Modelfiles,
llama-server command): `bundle.py`, decoding: `runtime.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from ftd.store import Artifact
from tasks.backends.base import AdapterChain, Backend, DeployContext, Deployment, Status
from tasks.backends.llama_cpp import bundle, convert, tools
from tasks.backends.llama_cpp.options import (
    ARCHITECTURES,
    CONVERTED,
    NAME,
    LlamaCppOptions,
    kv_cache_type,
    options_of,
    precision_of,
)
from tasks.backends.llama_cpp.runtime import MANIFEST, GgufEngine, loaded
from tasks.backends.shape import ModelShape, check_grouped_heads, refuse
from tasks.base_model import model_dir

# RoPE scaling types convert_hf_to_gguf.py writes for these architectures (conversion/base.py, llama.py)
ROPE_TYPES = ("linear", "yarn", "llama3", "longrope", "su")


class LlamaCpp(Backend):
    name = NAME
    modes = ("merged", "multi_lora")
    libraries = convert.LIBRARIES
    options_schema = LlamaCppOptions

    def check(self, target: TargetConfig, architecture: str) -> None:
        precision_of(target)
        if target.device != "cpu":
            raise ConfigError(
                f"targets.{target.name}.device: ftd builds llama.cpp for the CPU (device: cpu), not {target.device!r}"
            )
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"targets.{target.name}: ftd converts {', '.join(sorted(ARCHITECTURES))} to GGUF, not {architecture}"
            )

    def check_model(self, target: TargetConfig, model_config: dict) -> None:
        """What ggml asserts on (the process aborts: no error reaches the flow) or serves wrongly
        without a word: grouped heads (ggml_can_mul_mat), an even rotary size (ops.cpp
        'n_dims % 2 == 0'), a RoPE scaling the converter knows ('Unknown RoPE type' is only
        logged, and the model is then served unscaled), a q8_0 KV cache's 32-wide blocks."""
        shape = ModelShape.of(model_config)
        if shape is None:
            return
        check_grouped_heads(target, "llama.cpp (ggml)", shape)
        if shape.rotary_dim % 2:
            raise refuse(target, "llama.cpp (ggml)", "rotates an even number of dimensions per head",
                         f"rotates {shape.rotary_dim}")  # fmt: skip
        if shape.rope_type not in (None, "default", *ROPE_TYPES):
            raise refuse(target, "llama.cpp's converter", f"carries RoPE scaling of type {', '.join(ROPE_TYPES)} "
                         "(any other is served unscaled)", f"uses {shape.rope_type!r}")  # fmt: skip
        if kv_cache_type(target) == "q8_0" and shape.head_dim % 32:
            raise refuse(target, "llama.cpp", "quantises a q8_0 KV cache in blocks of 32 along each head",
                         f"has head size {shape.head_dim} (use kv_cache_type f16)")  # fmt: skip

    def check_adapters(self, target: TargetConfig, adapters: list[dict]) -> None:
        """What llama.cpp's LoRA converter stops on, refused before anything trains."""
        for a in adapters:
            field = f"adapters.{a['name']}"
            if a.get("use_dora"):
                raise ConfigError(f"{field}: a DoRA adapter (use_dora) cannot be served by llama.cpp target "
                                  f"{target.name}: its magnitude vectors have no GGUF form; use plain LoRA")  # fmt: skip
            if a.get("modules_to_save"):
                raise ConfigError(f"{field}: modules_to_save {a['modules_to_save']} (fully trained modules) cannot be "
                                  f"carried by llama.cpp target {target.name}'s LoRA GGUF; retrain without them")  # fmt: skip
            embedding = sorted({m for m in a["modules"] if m in ("embed_tokens", "wte", "word_embeddings")})
            if embedding:
                raise ConfigError(f"{field}: LoRA on the embedding ({', '.join(embedding)}) is not served by target "
                                  f"{target.name}; remove it from target_modules")  # fmt: skip

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        return tools.unavailable_reason()

    def deploy(self, ctx: DeployContext, target: TargetConfig, adapters: list[AdapterChain]) -> list[Deployment]:
        reason = self.unavailable_reason(target)
        if reason:
            skipped = ctx.skip(bundle.BUNDLE, target.name, reason)
            return [Deployment(target, a.name, skipped, Status.SKIPPED, reason) for a in adapters]
        base_config = json.loads((model_dir(ctx.base) / "config.json").read_text())
        n_ctx = bundle.context_length(base_config, target)
        if target.mode == "merged":
            deployments = []
            for a in adapters:
                gguf = self._model_gguf(ctx, target, a.merged, f"{a.name}/{target.name}")
                engine = ctx.run(bundle.bundle_task, f"{a.name}/{target.name}", model=gguf, loras=[],
                                 adapters=[a.adapter], base=ctx.base, target=target, n_ctx=n_ctx)  # fmt: skip
                deployments.append(self.deployment(target, a.name, engine))
            return deployments
        gguf = self._model_gguf(ctx, target, ctx.base, target.name)
        lora_type = options_of(target).lora_type
        loras = [ctx.run(convert.adapter_task, f"{a.name}/{target.name}", base=ctx.base, adapter=a.adapter,
                         lora_type=lora_type) for a in adapters]  # fmt: skip
        engine = ctx.run(bundle.bundle_task, target.name, model=gguf, loras=loras,
                         adapters=[a.adapter for a in adapters], base=ctx.base, target=target, n_ctx=n_ctx)  # fmt: skip
        return [self.deployment(target, a.name, engine) for a in adapters]

    def _model_gguf(self, ctx: DeployContext, target: TargetConfig, model: Artifact, label: str) -> Artifact:
        """The model's GGUF in the target's precision: written by the converter, or quantised from
        the lossless GGUF (cached, so several quantised targets share one conversion)."""
        precision = precision_of(target)
        pre_tokenizer = options_of(target).pre_tokenizer
        outtype = precision if precision in CONVERTED else convert.lossless_type(convert.model_folder(model, ctx.store))
        gguf = ctx.run(convert.model_task, label, model=model, outtype=outtype, pre_tokenizer=pre_tokenizer)
        if precision in CONVERTED:
            return gguf
        return ctx.run(convert.quantize_task, label, source=gguf, precision=precision)

    def context_length(self, engine_dir: Path, target: TargetConfig) -> int | None:
        return json.loads((Path(engine_dir) / MANIFEST).read_text())["n_ctx"]

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None) -> GgufEngine:
        model = loaded(Path(engine_dir).resolve())
        if target.mode != "multi_lora":
            return GgufEngine(model, None)
        if adapter not in model.adapters:
            raise FtdError(
                f"GGUF bundle {engine_dir} has no adapter {adapter!r} (it has {', '.join(sorted(model.adapters))})"
            )
        return GgufEngine(model, adapter)


BACKEND = LlamaCpp()
