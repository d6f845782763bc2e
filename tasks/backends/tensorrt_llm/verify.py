"""CPU checks of a TensorRT-LLM + Triton bundle: everything that would otherwise fail (or, worse,
silently misbehave) only once the bundle reaches a GPU server.

- every `config.pbtxt` parses with Triton's own schema; the ensemble's wiring connects existing
  tensors of equal dtype (so the LoRA dtype cannot differ between `ensemble` and `tensorrt_llm`);
- `lora_weights` is declared in the engine's dtype, which is also the `--lora_plugin` dtype;
- every warm-up input is a declared input of the same dtype and rank, and its file holds exactly
  the bytes its dims need;
- each adapter, read back from its raw warm-up files, passes the runtime's own checks (3-D with
  batch 1 once Triton adds the batch dimension, dtype = engine dtype, modules built into the
  engine, layer in range, 0 < rank ≤ max_lora_rank, rows long enough for r·(in+out));
- the ΔW each row makes, by TensorRT-LLM's layout, equals scale·B@A from the PEFT adapter.

Each failure names the file or adapter and what to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ftd.errors import FtdError
from tasks.backends.tensorrt_llm import lora as trt
from tasks.backends.tensorrt_llm import triton
from tasks.backends.tensorrt_llm.bundle import MANIFEST, REPOSITORY, expected_bytes
from tasks.merge import module_scale, read_adapter

# Largest |ΔW error| allowed, relative to the largest |ΔW|, per storage dtype (a few ulps).
TOLERANCE = {"fp32": 1e-5, "fp16": 4 * 2**-10, "bf16": 4 * 2**-7}


class Problems(list):
    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)


def verify_bundle(bundle: Path) -> dict:
    manifest = json.loads((bundle / MANIFEST).read_text())
    problems = Problems()
    configs = {}
    for name in triton.MODELS:
        path = bundle / REPOSITORY / name / "config.pbtxt"
        try:
            configs[name] = triton.parse(path.read_text(), str(path.relative_to(bundle)))
        except (OSError, ValueError) as exc:
            raise FtdError(f"bundle {manifest['target']}: {exc}") from None
        problems.check(configs[name].name == name, f"{path}: name {configs[name].name!r} differs from its directory")
        problems.check((path.parent / "1").is_dir(), f"{path.parent}: version directory 1/ missing")
    for name in (triton.PRE, triton.POST):
        problems.check((bundle / REPOSITORY / name / "1" / "model.py").is_file(), f"{name}/1/model.py missing")
    problems.check(
        (bundle / "tokenizer" / "tokenizer_config.json").is_file(), "tokenizer/ has no tokenizer_config.json"
    )
    _check_ensemble(configs, problems)
    engine = configs[triton.ENGINE]
    declared = {i.name: i for i in engine.input}
    lora_type = manifest["triton_lora_type"]
    if manifest["adapters"]:
        for model in (triton.ENSEMBLE, triton.ENGINE):
            weights = next((i for i in configs[model].input if i.name == "lora_weights"), None)
            got = triton.type_name(weights.data_type) if weights else None
            problems.check(
                got == lora_type,
                f"{model}/config.pbtxt declares lora_weights as {got} but the engine is {manifest['precision']} "
                f"({lora_type}): the runtime would reject or ignore the adapters; declare {lora_type}",
            )
        plugin = _flag(manifest["engine"]["commands"], "--lora_plugin")
        problems.check(
            plugin == manifest["lora_dtype"],
            f"build_engine.sh builds --lora_plugin {plugin} but the adapters are {manifest['lora_dtype']}",
        )
    warmup_dir = bundle / REPOSITORY / triton.ENGINE / "warmup"
    for warmup in engine.model_warmup:
        _check_warmup(warmup, declared, warmup_dir, problems)
    adapters = {}
    for name, entry in manifest["adapters"].items():
        adapters[name] = _check_adapter(bundle, manifest, name, entry, warmup_dir, engine, problems)
    ids = [a["task_id"] for a in manifest["adapters"].values()]
    problems.check(len(ids) == len(set(ids)), f"lora task ids are not unique: {ids}")
    if problems:
        raise FtdError(f"bundle {manifest['target']} failed its checks:\n- " + "\n- ".join(problems))
    summary = {
        "configs_parsed": len(configs),
        "warmup_entries": len(engine.model_warmup),
        "adapters_checked": len(adapters),
        "max_delta_rel_error": max((a["max_delta_rel_error"] for a in adapters.values()), default=0.0),
        "lora_dtype": manifest["lora_dtype"],
    }
    return {"summary": summary, "adapters": adapters}


def _flag(commands: list[list[str]], flag: str) -> str | None:
    for command in commands:
        if flag in command:
            return command[command.index(flag) + 1]
    return None


def _check_ensemble(configs: dict, problems: Problems) -> None:
    ensemble = configs[triton.ENSEMBLE]
    available = {i.name: i for i in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"ensemble step uses unknown model {step.model_name!r}")
            continue
        inputs = {i.name: i for i in model.input}
        for key, source in step.input_map.items():
            if key not in inputs:
                problems.append(f"ensemble maps {source!r} to {step.model_name}.{key}, which is not an input")
            elif source not in available:
                problems.append(f"ensemble: {step.model_name}.{key} reads {source!r}, produced by no earlier step")
            elif available[source] is not None and available[source].data_type != inputs[key].data_type:
                problems.append(
                    f"ensemble input {source} is {triton.type_name(available[source].data_type)} but "
                    f"{step.model_name}.{key} is {triton.type_name(inputs[key].data_type)}"
                )
        for name, item in inputs.items():
            problems.check(item.optional or name in step.input_map, f"ensemble never feeds {step.model_name}.{name}")
        outputs = {o.name for o in model.output}
        for key, produced in step.output_map.items():
            problems.check(key in outputs, f"ensemble reads {step.model_name}.{key}, which is not an output")
            available[produced] = None  # produced tensors take the producer's dtype
    for output in ensemble.output:
        problems.check(output.name in available, f"ensemble output {output.name} is produced by no step")


def _check_warmup(warmup, declared: dict, directory: Path, problems: Problems) -> None:
    for name, item in declared.items():
        problems.check(item.optional or name in warmup.inputs, f"warm-up {warmup.name} lacks required input {name}")
    for key, value in warmup.inputs.items():
        where = f"warm-up {warmup.name} input {key}"
        spec = declared.get(key)
        if spec is None:
            problems.append(f"{where}: not an input of tensorrt_llm")
            continue
        got, want = triton.type_name(value.data_type), triton.type_name(spec.data_type)
        problems.check(got == want, f"{where}: data_type {got} differs from the declared {want}")
        dims = list(value.dims)
        compatible = len(dims) == len(spec.dims) and all(d == s or s == -1 for d, s in zip(dims, spec.dims))
        problems.check(compatible, f"{where}: dims {dims} do not fit the declared dims {list(spec.dims)}")
        path = directory / value.input_data_file
        if not path.is_file():
            problems.append(f"{where}: file warmup/{value.input_data_file} missing")
            continue
        need = expected_bytes(got, dims)
        problems.check(
            path.stat().st_size == need, f"{where}: {path.name} has {path.stat().st_size} bytes, dims need {need}"
        )


def _check_adapter(
    bundle: Path, manifest: dict, name: str, entry: dict, warmup_dir: Path, engine, problems: Problems
) -> dict:  # fmt: skip
    """The runtime's checks (loraUtils.cpp) and ΔW against the PEFT adapter, for one adapter."""
    precision, model_config = manifest["precision"], manifest["model_config"]
    built = set(manifest["engine"]["lora_target_modules"])
    max_rank, layers = manifest["engine"]["max_lora_rank"], model_config["num_hidden_layers"]
    where = f"adapter {name}"
    if manifest["lora_delivery"] == "warmup":
        files = entry["warmup"]
        weights_path, config_path = warmup_dir / files["weights"], warmup_dir / files["config"]
        task_id = np.frombuffer((warmup_dir / files["task_id"]).read_bytes(), dtype="<u8")
        problems.check(task_id.tolist() == [entry["task_id"]], f"{where}: lora_id file holds {task_id.tolist()}")
        warmup = next(
            (w for w in engine.model_warmup if w.inputs["lora_task_id"].input_data_file == files["task_id"]), None
        )
        problems.check(warmup is not None, f"{where}: no model_warmup entry loads it")
        try:
            weights = trt.read_raw(weights_path, precision, entry["row_width"])
            config = trt.read_raw(config_path, np.int32, 3)
        except (OSError, FtdError) as exc:
            problems.append(f"{where}: {exc}")
            return {"task_id": entry["task_id"], "rows": None, "max_delta_rel_error": float("nan")}
        if warmup is not None:
            shapes = {k: list(warmup.inputs[k].dims) for k in ("lora_weights", "lora_config")}
            problems.check(shapes["lora_weights"] == list(weights.shape), f"{where}: warm-up dims {shapes} ≠ file")
            problems.check(shapes["lora_config"] == list(config.shape), f"{where}: warm-up dims {shapes} ≠ file")
    else:
        weights = np.load(bundle / "lora_prefetch" / str(entry["task_id"]) / "model.lora_weights.npy")[0]
        config = np.load(bundle / "lora_prefetch" / str(entry["task_id"]) / "model.lora_config.npy")[0]
        problems.check(weights.dtype == trt.numpy_dtype(precision), f"{where}: prefetch weights are {weights.dtype}")
    # As Triton delivers them (batch dimension added): 3-D, batch 1, equal row counts.
    batched_w, batched_c = weights[None], config[None]
    problems.check(batched_w.ndim == 3 and batched_w.shape[0] == 1, f"{where}: lora_weights is not [1, N, row]")
    problems.check(batched_c.shape[2] == 3 and batched_c.shape[1] == batched_w.shape[1],
                   f"{where}: lora_config {list(batched_c.shape)} does not match lora_weights {list(batched_w.shape)}")  # fmt: skip
    problems.check(weights.dtype == trt.numpy_dtype(precision),
                   f"{where}: weights are {weights.dtype}, the engine is {precision}: rebuild the bundle")  # fmt: skip
    dims = trt.module_dims(model_config)
    for i, (module_id, layer, rank) in enumerate(config.tolist()):
        module = trt.MODULE_NAMES.get(module_id, f"id {module_id}")
        row = f"{where}: lora_config row {i} ({module}, layer {layer}, rank {rank})"
        problems.check(module in built, f"{row}: module not built into the engine (built: {sorted(built)}); "
                                        "add it to --lora_target_modules")  # fmt: skip
        problems.check(0 <= layer < layers, f"{row}: layer out of range [0, {layers})")
        problems.check(0 < rank <= max_rank, f"{row}: rank outside (0, max_lora_rank={max_rank}]; raise max_lora_rank")
        if module in dims:
            need = rank * sum(dims[module])
            problems.check(
                weights.shape[1] >= need, f"{row}: row has {weights.shape[1]} values, needs r·(in+out)={need}"
            )
    return {"task_id": entry["task_id"], "rows": int(config.shape[0]),
            "max_delta_rel_error": _delta_error(bundle / "lora" / name, weights, config, dims, precision, where, problems)}  # fmt: skip


def _delta_error(peft_dir: Path, weights, config, dims, precision: str, where: str, problems: Problems) -> float:
    """Max over rows of |ΔW_engine − scale·B@A| / max|scale·B@A|, by TensorRT-LLM's row layout."""

    adapter_config, pairs = read_adapter(peft_dir)
    expected = {}
    for pair in pairs.values():
        match = trt.LAYER_MODULE.search(pair.module)
        hf = match["module"]
        delta = (pair.B.float() @ pair.A.float()).numpy() * module_scale(adapter_config, pair.module, pair.A.shape[0])
        if hf in trt.SWAPPED_HALVES:
            half = delta.shape[0] // 2
            delta = np.concatenate([delta[half:], delta[:half]])
        expected[(trt.MODULE_IDS[trt.HF_TO_TRT[hf]], int(match["layer"]))] = delta
    seen, worst = set(), 0.0
    for row, (module_id, layer, rank) in zip(weights, config.tolist()):
        module = trt.MODULE_NAMES.get(module_id)
        reference = expected.get((module_id, layer))
        if reference is None or module not in dims:
            problems.append(f"{where}: row ({module}, layer {layer}) has no counterpart in the PEFT adapter")
            continue
        seen.add((module_id, layer))
        in_dim, out_dim = reference.shape[1], reference.shape[0]
        if (in_dim, out_dim) != dims[module]:
            problems.append(f"{where}: {module} layer {layer} is {in_dim}→{out_dim}, the model's is {dims[module]}")
            continue
        if rank <= 0 or row.shape[0] < rank * (in_dim + out_dim):
            continue  # already reported by the runtime checks
        got = trt.delta_weight(row, rank, in_dim, out_dim)
        scale = float(np.abs(reference).max()) or 1.0
        worst = max(worst, float(np.abs(got - reference).max()) / scale)
    missing = sorted(set(expected) - seen)
    problems.check(not missing, f"{where}: PEFT modules missing from the converted arrays: {missing[:4]}")
    problems.check(worst <= TOLERANCE[precision], f"{where}: ΔW differs from PEFT's by {worst:.2e} (relative)")
    return worst
