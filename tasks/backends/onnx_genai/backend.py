"""ONNX Runtime GenAI: merged engines from the og model builder or optimum's exporter
(`builder.py`), multi-LoRA bundles of one base graph plus an `.onnx_adapter` per adapter
(`multi_lora.py`, `lora_graph.py`), run with `og.Generator` (`runtime.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import ConfigError
from tasks.backends.base import AdapterChain, Backend, DeployContext, Deployment, Status, gpu_unavailable_reason
from tasks.backends.onnx_genai import builder, multi_lora
from tasks.backends.onnx_genai.builder import (
    ARCHITECTURES,
    EXPORTERS,
    OPTIMUM_SUPPORTED,
    OPTION_KEYS,
    SUPPORTED,
    exporter_of,
)
from tasks.backends.onnx_genai.runtime import OgEngine
from tasks.backends.runtime import Engine
from tasks.backends.shape import ModelShape, check_grouped_heads, refuse


def _pairs(pairs: set[tuple[str, str]]) -> str:
    return ", ".join(f"{p}/{d}" for p, d in sorted(pairs))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class OnnxGenAI(Backend):
    name = "onnx_genai"
    modes = ("merged", "multi_lora")
    libraries = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch", "optimum",
                 "optimum-onnx")  # fmt: skip

    def check(self, target: TargetConfig, architecture: str) -> None:
        field = f"targets.{target.name}.options"
        unknown = set(target.options) - set(OPTION_KEYS)
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {sorted(unknown)} (known: {', '.join(OPTION_KEYS)})")
        exporter = exporter_of(target)
        if exporter not in EXPORTERS:
            raise ConfigError(f"{field}.exporter: {exporter!r} is not one of {', '.join(EXPORTERS)}")
        extra = target.options.get("extra_options")
        if extra is not None and not isinstance(extra, dict):
            raise ConfigError(f"{field}.extra_options: expected a mapping of builder option to value, got {extra!r}")
        if (target.precision, target.device) not in SUPPORTED:
            raise ConfigError(
                f"targets.{target.name}: precision {target.precision!r} on device {target.device!r} "
                f"is not supported by onnx_genai (supported: {_pairs(SUPPORTED)})"
            )
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"targets.{target.name}: onnx_genai cannot build {architecture}")
        if getattr(target, "mode", "merged") == "multi_lora" and "adapter_path" in (extra or {}):
            raise ConfigError(f"{field}.extra_options: adapter_path bakes one adapter into the graph; a multi_lora "
                              "target gets every adapter's LoRA branches from ftd (remove adapter_path)")  # fmt: skip
        if exporter == "optimum":
            if (target.precision, target.device) not in OPTIMUM_SUPPORTED:
                raise ConfigError(
                    f"{field}.exporter: 'optimum' builds only {_pairs(OPTIMUM_SUPPORTED)} "
                    f"(this target is {target.precision}/{target.device}); use exporter 'builder' for "
                    f"{_pairs(SUPPORTED - OPTIMUM_SUPPORTED)}"
                )
            if getattr(target, "mode", "merged") != "merged":
                raise ConfigError(
                    f"{field}.exporter: 'optimum' exports merged engines only; mode {target.mode!r} is built "
                    "on the builder's graph of the base model (use exporter 'builder')"
                )
            if "config_only" in (extra or {}):
                raise ConfigError(f"{field}.extra_options: config_only is set by the optimum exporter path itself")

    def check_model(self, target: TargetConfig, model_config: dict) -> None:
        """ONNX Runtime's CPU GroupQueryAttention (the builder's attention on CPU, rotary fused in)
        refuses at its first token, not at build: 'head_size shall be a multiple of 16'
        (group_query_attention_helper.h), and a rotary cache 'dimension 1 must be <= head_size / 2
        and a multiple of 8'. optimum's graph has plain attention and is not bound by them."""
        if exporter_of(target) != "builder" or target.device != "cpu":
            return
        shape = ModelShape.of(model_config)
        if shape is None:
            return
        engine = "ONNX Runtime's GroupQueryAttention CPU kernel"
        check_grouped_heads(target, engine, shape)
        if shape.head_dim % 16:
            raise refuse(target, engine, "needs a head size that is a multiple of 16 ('head_size shall be a "
                         "multiple of 16')", f"has head size {shape.head_dim} (use exporter: optimum)")  # fmt: skip
        if shape.rotary_dim % 16:
            raise refuse(target, engine, "needs a rotary dimension that is a multiple of 16",
                         f"rotates {shape.rotary_dim} of each head's {shape.head_dim} dimensions")  # fmt: skip

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "the onnxruntime-genai package is not installed"
        if exporter_of(target) == "optimum" and not _importable("optimum.exporters.onnx"):
            return "exporter optimum needs the optimum and optimum-onnx packages; they are not installed"
        if target.device == "cuda":
            import onnxruntime_genai as og

            missing = [] if og.is_cuda_available() else ["the onnxruntime-genai-cuda package"]
            return gpu_unavailable_reason("device cuda", missing)
        return None

    def options(self, target: TargetConfig) -> dict:
        return target.options  # checked key by key in `check` (the builder's extra_options are free-form)

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        return builder.build(merged_dir, target, out)

    def deploy(self, ctx: DeployContext, target: TargetConfig, adapters: list[AdapterChain]) -> list[Deployment]:
        if target.mode == "merged":
            return super().deploy(ctx, target, adapters)
        # multi_lora: one base graph for all adapters (cached on the module set), one export per adapter
        reason = self.unavailable_reason(target)
        if reason:
            skipped = ctx.skip(multi_lora.BUNDLE, target.name, reason)
            return [Deployment(target, a.name, skipped, Status.SKIPPED, reason) for a in adapters]
        modules = multi_lora.union_targets([a.adapter for a in adapters], ctx.store)
        graph = ctx.run(multi_lora.graph_task, target.name, base=ctx.base, modules=modules, target=target)
        exports = [ctx.run(multi_lora.export_task, f"{a.name}/{target.name}", graph=graph, adapter=a.adapter)
                   for a in adapters]  # fmt: skip
        bundle = ctx.run(multi_lora.bundle_task, target.name, graph=graph, exports=exports)
        return [self.deployment(target, a.name, bundle) for a in adapters]

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None) -> Engine:
        if target.mode == "multi_lora":
            return multi_lora.MultiLoraEngine.shared(Path(engine_dir).resolve()).with_adapter(adapter)
        return OgEngine(engine_dir)


BACKEND = OnnxGenAI()
