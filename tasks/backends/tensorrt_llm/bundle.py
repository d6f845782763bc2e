"""Write a TensorRT-LLM + Triton deployment bundle: model repository, warm-up files, converted
adapters, the engine-build and launch scripts, and a README, all derived from one manifest.

Layout (mounted at /ftd-bundle in the Triton container):

    bundle.json                 manifest: dtype, modules, ranks, task ids, commands (the checks read it)
    README.md  build_engine.sh  launch_triton.sh  request.sh
    hf_model/                   the HF checkpoint the engine is built from (hard links)
    tokenizer/                  the experiment's tokenizer (also gives end_id / pad_id)
    lora/<adapter>/             PEFT adapter + model.lora_{weights,config}.npy (TensorRT-LLM arrays)
    lora_prefetch/<task id>/    only with lora_delivery: prefetch
    model_repository/{ensemble,preprocessing,postprocessing,tensorrt_llm}/config.pbtxt + 1/
    model_repository/tensorrt_llm/warmup/   raw little-endian inputs of the model_warmup entries
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftd.store import link_or_copy
from tasks.backends.tensorrt_llm import lora as trt
from tasks.backends.tensorrt_llm import triton
from tasks.merge import TOKENIZER_FILES

MANIFEST = "bundle.json"
FORMAT = "ftd-triton-tensorrt-llm/1"
REPOSITORY = "model_repository"
ENGINE_VERSION_DIR = f"{REPOSITORY}/{triton.ENGINE}/1"
MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".jinja")


@dataclass(frozen=True)
class BundleAdapter:
    name: str
    task_id: int
    converted: Path  # directory with model.lora_{weights,config}.npy
    peft_dir: Path


@dataclass(frozen=True)
class BundleSpec:
    target: str
    mode: str
    precision: str
    architecture: str
    model_config: dict
    model_dir: Path
    tokenizer_dir: Path
    adapters: list[BundleAdapter]
    options: dict  # TrtLlmOptions as a dict
    end_id: int
    pad_id: int
    warmup_ids: list[int]
    build_commands: list[list[str]]
    engine_dir: Path | None = None
    engine_skip_reason: str | None = None
    example_prompt: str = "Hello"
    mount: str = "/ftd-bundle"


def write_bundle(spec: BundleSpec, out: Path) -> dict:
    """Write every file of the bundle into `out`; return the manifest."""
    options = spec.options
    loras = {a.name: _load_converted(a) for a in spec.adapters}
    weights_type = trt.TRITON_TYPES[spec.precision] if loras else None
    modules = sorted({m for lora in loras.values() for m in lora.modules()})
    max_rank = options.get("max_lora_rank") or max((lo.max_rank for lo in loras.values()), default=0)
    engine_path = f"{spec.mount}/{ENGINE_VERSION_DIR}"

    _copy_model(spec.model_dir, out / "hf_model")
    for name in TOKENIZER_FILES:
        if (spec.tokenizer_dir / name).is_file():
            link_or_copy(spec.tokenizer_dir / name, out / "tokenizer" / name)
    for adapter in spec.adapters:
        target = out / "lora" / adapter.name
        for item in [*adapter.converted.glob("model.lora_*.npy"), *adapter.peft_dir.glob("adapter_*")]:
            link_or_copy(item, target / item.name)
    if options["lora_delivery"] == "prefetch":
        for adapter in spec.adapters:
            for item in adapter.converted.glob("model.lora_*.npy"):
                link_or_copy(item, out / "lora_prefetch" / str(adapter.task_id) / item.name)

    repo = out / REPOSITORY
    warmups = _write_warmup(repo / triton.ENGINE / "warmup", spec, loras)
    engine_parameters = _engine_parameters(spec, loras, max_rank, engine_path)
    configs = {
        triton.ENSEMBLE: triton.ensemble_config(options["max_batch_size"], weights_type),
        triton.PRE: triton.preprocessing_config(options["max_batch_size"], spec.end_id, spec.pad_id),
        triton.POST: triton.postprocessing_config(options["max_batch_size"]),
        triton.ENGINE: triton.engine_config(options["max_batch_size"], weights_type, engine_parameters, warmups),
    }
    models_src = Path(__file__).parent / "triton_models"
    for name, config in configs.items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(triton.to_text(config))
    shutil.copy2(models_src / "preprocessing.py", repo / triton.PRE / "1" / "model.py")
    shutil.copy2(models_src / "postprocessing.py", repo / triton.POST / "1" / "model.py")
    engine_built = spec.engine_dir is not None
    if engine_built:
        for item in spec.engine_dir.iterdir():
            if item.is_file() and item.name != "ftd-manifest.json":
                link_or_copy(item, out / ENGINE_VERSION_DIR / item.name)
    else:
        (out / ENGINE_VERSION_DIR / "ENGINE_NOT_BUILT.txt").write_text(
            f"Run ../../../build_engine.sh on a machine with an NVIDIA GPU and tensorrt_llm.\n"
            f"Reason it was not built by ftd: {spec.engine_skip_reason}\n"
        )

    manifest = {
        "format": FORMAT,
        "target": spec.target,
        "mode": spec.mode,
        "precision": spec.precision,
        "lora_dtype": trt.DTYPES[spec.precision],
        "triton_lora_type": weights_type,
        "architecture": spec.architecture,
        "model_config": {
            k: spec.model_config.get(k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
            )
        },  # fmt: skip
        "engine": {
            "built": engine_built,
            "skip_reason": spec.engine_skip_reason,
            "path_in_container": engine_path,
            "lora_target_modules": modules,
            "max_lora_rank": max_rank,
            "commands": spec.build_commands,
        },
        "end_id": spec.end_id,
        "pad_id": spec.pad_id,
        "warmup": {
            "prompt": options["warmup_prompt"],
            "input_ids": spec.warmup_ids,
            "output_len": options["warmup_output_len"],
        },  # fmt: skip
        "lora_delivery": options["lora_delivery"] if loras else None,
        "lora_cache": {k: v for k, v in engine_parameters.items() if k.startswith("lora_cache")},
        "adapters": {
            a.name: {
                "task_id": a.task_id,
                "rows": loras[a.name].rows,
                "row_width": int(loras[a.name].weights.shape[1]),
                "ranks": sorted({int(r) for r in loras[a.name].config[:, 2]}),
                "modules": loras[a.name].modules(),
                "warmup": {
                    "weights": f"adapter_model_{a.task_id}.bin",
                    "config": f"adapter_config_{a.task_id}.bin",
                    "task_id": f"lora_id_{a.task_id}",
                },  # fmt: skip
            }
            for a in spec.adapters
        },
        "example_prompt": spec.example_prompt,
        "mount": spec.mount,
        "triton_image": options["triton_image"],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _write_scripts(out, manifest)
    return manifest


def _load_converted(adapter: BundleAdapter) -> trt.TrtLora:
    weights = np.load(adapter.converted / "model.lora_weights.npy")
    config = np.load(adapter.converted / "model.lora_config.npy")
    meta = json.loads((adapter.converted / "conversion.json").read_text())
    weights = weights[0].view(trt.numpy_dtype(meta["precision"]))
    return trt.TrtLora(adapter.name, meta["precision"], weights, config[0], meta["sources"])


def _copy_model(model_dir: Path, out: Path) -> None:
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix in MODEL_FILES and item.name != "ftd-manifest.json":
            link_or_copy(item, out / item.name)


def _engine_parameters(spec: BundleSpec, loras: dict, max_rank: int, engine_path: str) -> dict[str, str]:
    options = spec.options
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": engine_path,
        "max_beam_width": str(options["max_beam_width"]),
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": str(options["kv_cache_free_gpu_mem_fraction"]),
        "exclude_input_in_output": "true",
    }
    if loras:
        total = sum(lo.weights.nbytes for lo in loras.values())
        ranks = [int(r) for lo in loras.values() for r in lo.config[:, 2]]
        params.update({
            # pages sized for the most common rank; a page must hold one row of the largest rank
            "lora_cache_optimal_adapter_size": str(max(set(ranks), key=ranks.count)),
            "lora_cache_max_adapter_size": str(max_rank),
            "lora_cache_gpu_memory_fraction": str(options["lora_cache_gpu_memory_fraction"]),
            "lora_cache_host_memory_bytes": str(max(options["lora_cache_host_memory_bytes"], 2 * total)),
        })  # fmt: skip
        if options["lora_delivery"] == "prefetch":
            params["lora_prefetch_dir"] = f"{spec.mount}/lora_prefetch"
    return params


def _write_warmup(directory: Path, spec: BundleSpec, loras: dict) -> list[triton.Warmup]:
    """One model_warmup entry per adapter (the seed's recipe), with dtypes equal to the declared inputs."""
    if not loras or spec.options["lora_delivery"] != "warmup":
        return []
    directory.mkdir(parents=True, exist_ok=True)
    ids = spec.warmup_ids
    (directory / "input_ids").write_bytes(struct.pack(f"<{len(ids)}i", *ids))
    for name, value in (("input_lengths", len(ids)), ("request_output_len", spec.options["warmup_output_len"]),
                        ("end_id", spec.end_id), ("pad_id", spec.pad_id), ("beam_width", 1)):  # fmt: skip
        (directory / name).write_bytes(struct.pack("<i", value))
    weights_type = trt.TRITON_TYPES[spec.precision]
    warmups = []
    for adapter in spec.adapters:
        lora, k = loras[adapter.name], adapter.task_id
        (directory / f"lora_id_{k}").write_bytes(struct.pack("<Q", k))
        trt.write_raw(lora, directory / f"adapter_model_{k}.bin", directory / f"adapter_config_{k}.bin")
        inputs = {
            "lora_task_id": triton.WarmupInput("TYPE_UINT64", (1,), f"lora_id_{k}"),
            "lora_weights": triton.WarmupInput(weights_type, tuple(lora.weights.shape), f"adapter_model_{k}.bin"),
            "lora_config": triton.WarmupInput("TYPE_INT32", tuple(lora.config.shape), f"adapter_config_{k}.bin"),
            "input_ids": triton.WarmupInput("TYPE_INT32", (len(ids),), "input_ids"),
            "input_lengths": triton.WarmupInput("TYPE_INT32", (1,), "input_lengths"),
            "request_output_len": triton.WarmupInput("TYPE_INT32", (1,), "request_output_len"),
            "end_id": triton.WarmupInput("TYPE_INT32", (1,), "end_id"),
            "pad_id": triton.WarmupInput("TYPE_INT32", (1,), "pad_id"),
            "beam_width": triton.WarmupInput("TYPE_INT32", (1,), "beam_width"),
        }
        warmups.append(triton.Warmup(f"lora_{adapter.name}_warmup", inputs))
    return warmups


# ---------------------------------------------------------------- scripts and README


def _write_scripts(out: Path, manifest: dict) -> None:
    import shlex

    commands = manifest["engine"]["commands"]
    build = ["#!/usr/bin/env bash", "# Build the TensorRT-LLM engine into model_repository/tensorrt_llm/1 (needs an",
             "# NVIDIA GPU and `pip install tensorrt_llm` of the version in the Triton image).", "set -euo pipefail",
             'cd "$(dirname "$0")"', *(shlex.join(c) for c in commands), "rm -f " + ENGINE_VERSION_DIR + "/ENGINE_NOT_BUILT.txt",
             'echo "engine written to ' + ENGINE_VERSION_DIR + '"']  # fmt: skip
    launch = ["#!/usr/bin/env bash", "# Start Triton with this bundle's model repository (HTTP 8000, gRPC 8001, metrics 8002).",
              "set -euo pipefail", 'BUNDLE="$(cd "$(dirname "$0")" && pwd)"',
              "docker run --rm --gpus all --net host --shm-size=2g --ulimit memlock=-1 --ulimit stack=67108864 \\",
              f'  -v "$BUNDLE":{manifest["mount"]} {manifest["triton_image"]} \\',
              f"  tritonserver --model-repository={manifest['mount']}/{REPOSITORY} --disable-auto-complete-config"]  # fmt: skip
    request = ["#!/usr/bin/env bash", "# One request per adapter from requests/*.json: clients send only lora_task_id.",
               "set -euo pipefail", 'cd "$(dirname "$0")"', 'URL="${TRITON_URL:-http://localhost:8000}"',
               "for body in requests/*.json; do", '  echo "# $body"',
               '  curl -s -X POST "$URL/v2/models/ensemble/generate" -d @"$body"', "  echo", "done"]  # fmt: skip
    (out / "requests").mkdir(exist_ok=True)
    for name, body in request_bodies(manifest).items():
        (out / "requests" / f"{name}.json").write_text(json.dumps(body, indent=2) + "\n")
    for name, lines in (("build_engine.sh", build), ("launch_triton.sh", launch), ("request.sh", request)):
        (out / name).write_text("\n".join(lines) + "\n")
        (out / name).chmod(0o755)
    (out / "README.md").write_text(readme(manifest))


def request_bodies(manifest: dict) -> dict[str, dict]:
    """The example prompt, formatted with the chat template the adapters were trained with."""
    prompt = manifest["example_prompt"]
    if not manifest["adapters"]:
        return {"request": {"text_input": prompt, "max_tokens": 32}}
    return {name: {"text_input": prompt, "max_tokens": 32, "lora_task_id": a["task_id"]}
            for name, a in manifest["adapters"].items()}  # fmt: skip


def readme(manifest: dict) -> str:
    engine = manifest["engine"]
    adapters = manifest["adapters"]
    rows = "\n".join(
        f"| {name} | {a['task_id']} | {', '.join(map(str, a['ranks']))} | {', '.join(a['modules'])} | {a['rows']} × {a['row_width']} |"
        for name, a in adapters.items()
    )
    status = (
        "The engine is included (`model_repository/tensorrt_llm/1`)."
        if engine["built"]
        else f"**The engine is not built yet**: {engine['skip_reason']}. Build it with step 1."
    )
    delivery = {
        "warmup": "Every adapter is loaded by a `model_warmup` entry of `tensorrt_llm/config.pbtxt` when the model "
        "starts, so a request carries only `lora_task_id`.",
        "prefetch": "Every adapter is preloaded from `lora_prefetch/<task id>/` (`lora_prefetch_dir`), so a request "
        "carries only `lora_task_id`. Needs tensorrtllm_backend ≥ 0.19 (C++ backend).",
        None: "This bundle serves the model without LoRA.",
    }[manifest["lora_delivery"]]
    table = (
        f"| adapter | lora_task_id | rank(s) | modules | lora_weights |\n|---|---|---|---|---|\n{rows}\n"
        if adapters
        else ""
    )
    import shlex

    lora_note = (
        f" (LoRA weights stored as {manifest['lora_dtype']}, declared `{manifest['triton_lora_type']}` in "
        "`ensemble` and `tensorrt_llm`)"
        if adapters
        else ", merged weights, no LoRA inputs"
    )
    name, body = next(iter(request_bodies(manifest).items()))
    example = shlex.quote(json.dumps(body))
    commands = "\n".join(shlex.join(c) for c in engine["commands"])
    return f"""# TensorRT-LLM + Triton bundle: {manifest["target"]}

Built by ftd from the experiment's {manifest["architecture"]} model, {manifest["precision"]} engine{lora_note}.
{status}

{delivery}

{table}
## 1. Build the engine (GPU machine, tensorrt_llm installed — or inside the Triton image)

Copy the bundle out of ftd's artifact store first (`cp -rL`, or download the registered version
from MLflow): store artifacts are immutable and shared by hard links.

```bash
./build_engine.sh
```

which runs, from this directory:

```bash
{commands}
```

`--lora_target_modules` and `--max_lora_rank {engine["max_lora_rank"]}` come from the adapters above; the engine
must be built with them, or the runtime rejects the adapters ("lora module ... not enabled",
"Invalid low_rank").

## 2. Start Triton

```bash
./launch_triton.sh
```

The bundle is mounted at `{manifest["mount"]}` inside `{manifest["triton_image"]}`
(`config.pbtxt` refers to `{engine["path_in_container"]}`). Use the Triton image whose TensorRT-LLM
version built the engine.

## 3. Send a request with a `lora_task_id`

```bash
curl -X POST localhost:8000/v2/models/ensemble/generate -d {example}
```

(the body of `requests/{name}.json`). `./request.sh` sends every file in `requests/`, one per adapter.
Triton's preprocessing tokenizes the text as it is: format prompts with the chat template the
adapters were trained with (`tokenizer/`), as the example does. End id {manifest["end_id"]},
pad id {manifest["pad_id"]}.

## Files

- `bundle.json` — manifest (dtype, modules, ranks, task ids, commands); the checks ftd ran read it.
- `lora/<adapter>/` — the PEFT adapter and its TensorRT-LLM arrays (`model.lora_weights.npy`
  `[1, N, row]`, `model.lora_config.npy` int32 `[1, N, 3]`, rows `[module_id, layer, rank]`).
  TensorRT-LLM's `.npy` reader has no bfloat16: a bf16 bundle loads adapters through warm-up.
- `model_repository/tensorrt_llm/warmup/` — raw little-endian warm-up inputs.
"""


def bytes_per_value(triton_type: str) -> int:
    return {"TYPE_FP16": 2, "TYPE_BF16": 2, "TYPE_FP32": 4, "TYPE_INT32": 4, "TYPE_UINT32": 4, "TYPE_INT64": 8,
            "TYPE_UINT64": 8}[triton_type]  # fmt: skip


def expected_bytes(triton_type: str, dims: list[int]) -> int:
    return math.prod(dims) * bytes_per_value(triton_type)
