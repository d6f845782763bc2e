"""The cached stages of a TensorRT-LLM target: convert each adapter, build the engine (GPU only),
assemble and verify the Triton bundle.

    trt-lora (one per adapter)  ─┐
    trt-engine (skipped here)   ─┼─► triton-bundle (written, then verified on CPU)

A skipped engine is an artifact record with the reason, never cached, so the build runs as soon
as it is retried on a GPU machine; the bundle's key includes the engine's, so that run produces a
new bundle version with the engine inside.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import FtdError
from ftd.orchestration import stage_task
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from tasks.backends.registry import get_backend
from tasks.backends.tensorrt_llm import lora as trt
from tasks.backends.tensorrt_llm.bundle import ENGINE_VERSION_DIR, BundleAdapter, BundleSpec, write_bundle
from tasks.backends.tensorrt_llm.options import build_commands, options_of
from tasks.backends.tensorrt_llm.verify import verify_bundle
from tasks.base_model import model_dir
from tasks.modeling import eos_token_ids, load_tokenizer
from tasks.sft import adapter_dir

LORA, ENGINE, BUNDLE = "trt-lora", "trt-engine", "triton-bundle"
HERE = Path(__file__).parent


def hf_dir(model: Artifact, store: Store) -> Path:
    """The HF checkpoint of a base-model record (points elsewhere) or a merged artifact (in the store)."""
    return model_dir(model) if "model_dir" in model.meta else model.path(store)


def hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


# ---------------------------------------------------------------- 1. adapters


def lora_key(adapter: Artifact, target: TargetConfig) -> str:
    return stage_key(
        LORA,
        code=code_version(HERE / "lora.py", __file__),
        config={"precision": target.precision},
        inputs=[adapter.key],
        libraries=library_versions("numpy", "ml_dtypes", "torch", "safetensors"),
    )


def convert_lora(adapter: Artifact, target: TargetConfig, store: Store) -> Artifact:
    name = adapter.meta["adapter_name"]

    def build(tmp: Path) -> dict:
        converted = trt.convert(name, adapter_dir(adapter, store), target.precision)
        trt.write_npy(converted, tmp)
        meta = {"adapter_name": name, "precision": target.precision, "rows": converted.rows,
                "row_width": int(converted.weights.shape[1]), "max_rank": converted.max_rank,
                "modules": converted.modules(), "sources": converted.sources,
                "bytes": int(converted.weights.nbytes)}  # fmt: skip
        (tmp / "conversion.json").write_text(json.dumps(meta, indent=2))
        return meta

    return store.materialize(LORA, lora_key(adapter, target), build, lineage={"adapter": adapter.key})


# ---------------------------------------------------------------- 2. the engine


def engine_plan(model: Artifact, loras: list[Artifact], target: TargetConfig, architecture: str) -> dict:
    options = options_of(target)
    modules = sorted({m for lo in loras for m in lo.meta["modules"]})
    max_rank = options.max_lora_rank or max((lo.meta["max_rank"] for lo in loras), default=0)
    return {"modules": modules, "max_rank": max_rank, "architecture": architecture,
            "options": options.model_dump(include={"max_batch_size", "max_input_len", "max_seq_len", "max_beam_width"}),
            "precision": target.precision, "model": model.key}  # fmt: skip


def engine_key(model: Artifact, loras: list[Artifact], target: TargetConfig, architecture: str) -> str:
    return stage_key(
        ENGINE,
        code=code_version(__file__, HERE / "options.py", HERE / "backend.py"),
        config=engine_plan(model, loras, target, architecture),
        inputs=[model.key],
        libraries=library_versions("tensorrt_llm", "tensorrt"),
    )


def build_engine(
    model: Artifact, loras: list[Artifact], target: TargetConfig, architecture: str, store: Store
) -> Artifact:  # fmt: skip
    """`from_hugging_face` + `trtllm-build` with the LoRA plugin; skipped (with the reason) when no
    GPU or no tensorrt_llm is present."""
    key = engine_key(model, loras, target, architecture)
    plan = engine_plan(model, loras, target, architecture)
    reason = get_backend(target.backend).unavailable_reason(target)
    if reason:
        return Artifact(stage=ENGINE, key=key, meta={"skipped": True, "reason": reason, "target": target.name, **plan})

    def build(tmp: Path) -> dict:
        ckpt = tmp / ".checkpoint"
        commands = build_commands(architecture, target, plan["modules"], plan["max_rank"], str(hf_dir(model, store)),
                                  str(ckpt), str(tmp))  # fmt: skip
        started, log = time.perf_counter(), []
        for command in commands:
            proc = subprocess.run(command, capture_output=True, text=True)
            log.append(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                (tmp / "build.log").write_text("\n".join(log))
                raise FtdError(f"TensorRT-LLM engine build failed ({command[0]}): " + " | ".join(
                    proc.stderr.strip().splitlines()[-5:]))  # fmt: skip
        (tmp / "build.log").write_text("\n".join(log))
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
        return {"build_seconds": round(time.perf_counter() - started, 2), **plan}

    return store.materialize(ENGINE, key, build, lineage={"model": model.key})


# ---------------------------------------------------------------- 3. the bundle


def bundle_key(model: Artifact, tokenizer_from: Artifact, loras: list[Artifact], engine: Artifact,
               target: TargetConfig) -> str:  # fmt: skip
    return stage_key(
        BUNDLE,
        code=code_version(
            HERE / "bundle.py",
            HERE / "triton.py",
            HERE / "verify.py",
            __file__,
            *sorted((HERE / "triton_models").glob("*.py")),
        ),  # fmt: skip
        config={"target": target.model_dump(mode="json", exclude={"name", "thresholds"}), "name": target.name},
        inputs=[
            model.key,
            tokenizer_from.key,
            *[lo.key for lo in loras],
            engine.key if not engine.meta.get("skipped") else "engine-not-built",
        ],  # fmt: skip
        libraries=library_versions("tritonclient", "protobuf", "transformers"),
    )


def assemble_bundle(
    model: Artifact, tokenizer_from: Artifact, adapters: list[Artifact], loras: list[Artifact], engine: Artifact,
    target: TargetConfig, architecture: str, store: Store,
) -> Artifact:  # fmt: skip
    """Write the bundle and run every CPU check on it before it can be stored."""
    options = options_of(target)
    plan = engine_plan(model, loras, target, architecture)
    source_dir = adapter_dir(tokenizer_from, store)

    def build(tmp: Path) -> dict:
        tokenizer = load_tokenizer(source_dir)
        eos = eos_token_ids(tokenizer, hf_dir(model, store))
        end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos[0]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        example = options.warmup_prompt
        if tokenizer.chat_template:
            example = tokenizer.apply_chat_template([{"role": "user", "content": example}], tokenize=False,
                                                    add_generation_prompt=True)  # fmt: skip
        warmup_ids = tokenizer.encode(example, add_special_tokens=False) or [end_id]
        commands = build_commands(architecture, target, plan["modules"], plan["max_rank"], "hf_model",
                                  ".trt_checkpoint", ENGINE_VERSION_DIR)  # fmt: skip
        spec = BundleSpec(
            target=target.name, mode=target.mode, precision=target.precision, architecture=architecture,
            model_config=hf_config(hf_dir(model, store)), model_dir=hf_dir(model, store), tokenizer_dir=source_dir,
            adapters=[BundleAdapter(lo.meta["adapter_name"], task_id, lo.path(store), adapter_dir(a, store))
                      for task_id, (a, lo) in enumerate(zip(adapters, loras), start=1)],
            options=options.model_dump(), end_id=int(end_id), pad_id=int(pad_id), warmup_ids=warmup_ids,
            build_commands=commands, engine_dir=None if engine.meta.get("skipped") else engine.path(store),
            engine_skip_reason=engine.meta.get("reason"), example_prompt=example,
        )  # fmt: skip
        manifest = write_bundle(spec, tmp)
        checks = verify_bundle(tmp)
        (tmp / "checks.json").write_text(json.dumps(checks, indent=2))
        return {"target": target.name, "backend": target.backend, "precision": target.precision,
                "adapters": sorted(manifest["adapters"]), "engine_built": manifest["engine"]["built"],
                "engine_skip_reason": manifest["engine"]["skip_reason"], "checks": checks["summary"],
                "task_ids": {n: a["task_id"] for n, a in manifest["adapters"].items()}}  # fmt: skip

    key = bundle_key(model, tokenizer_from, loras, engine, target)
    return store.materialize(BUNDLE, key, build, lineage={"model": model.key, "engine": engine.key})


# ---------------------------------------------------------------- the stages, as cached tasks


def _unavailable(target: TargetConfig) -> str | None:
    return get_backend(target.backend).unavailable_reason(target)  # skipped here: not cached, a GPU machine builds it


lora_task = stage_task(convert_lora, LORA, lora_key, "trt-lora[{adapter.meta[adapter_name]}]")
engine_task = stage_task(build_engine, ENGINE, engine_key, "trt-engine[{target.name}]", skip_reason=_unavailable)
bundle_task = stage_task(assemble_bundle, BUNDLE, bundle_key, "triton-bundle[{target.name}]")
