"""The multi-LoRA bundle for DashInfer 2.x (CUDA): the base model plus every adapter laid out as
DashInfer's converter expects, and a launch script that mirrors the documented flow.

DashInfer's converter (seed 000) reads `<loras>/<name>/adapter_config.json` — only `r` and
`lora_alpha` — and the weights only from a pickled `adapter_model.bin`, folding `alpha / r` into
the update. So each adapter is rewritten for exactly those semantics:

- `adapter_model.bin` is `torch.save` of the tensors alone (no code), checked by reloading it with
  `torch.load(weights_only=True)`;
- rsLoRA (`alpha / sqrt(r)`) and per-module `alpha_pattern` scales are folded into B relative to
  the plain `alpha / r` DashInfer will apply, and the config says `use_rslora: false` with no
  patterns, so the served update equals the trained one (checked: ΔW per module);
- per-module `rank_pattern` is refused: the converter reads one `r` per adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ftd.errors import FtdError
from ftd.store import code_version, library_versions, link_or_copy, stage_key
from tasks.backends.dashinfer.options import options_of
from tasks.base_model import model_dir
from tasks.merge import module_scale, read_adapter
from tasks.sft import adapter_dir

LAUNCH = "launch_dashinfer.py"
MANIFEST = "bundle.json"


def rewrite_adapter(name: str, peft_dir: Path, out: Path) -> dict:
    """Write `out/adapter_config.json` + `out/adapter_model.bin` with plain alpha/r semantics."""
    import torch

    try:
        config, pairs = read_adapter(peft_dir)
    except FtdError as exc:
        raise FtdError(f"adapter {name} cannot be served by DashInfer: {exc}") from None
    if config.get("rank_pattern"):
        raise FtdError(
            f"adapter {name}: rank_pattern {config['rank_pattern']} gives modules different ranks, but DashInfer's "
            "converter reads a single `r` per adapter; retrain with one rank"
        )
    rank = int(config["r"])
    plain = config["lora_alpha"] / rank
    tensors, rescaled = {}, []
    for pair in pairs.values():
        if pair.A.shape[0] != rank:
            raise FtdError(f"adapter {name}: {pair.module} has rank {pair.A.shape[0]}, its config says r={rank}")
        true_scale = module_scale(config, pair.module, rank)
        factor = true_scale / plain
        B = pair.B.float() * factor if not math.isclose(factor, 1.0, rel_tol=1e-12) else pair.B
        if B is not pair.B:
            rescaled.append(pair.module)
        prefix = f"base_model.model.{pair.module}"
        tensors[f"{prefix}.lora_A.weight"] = pair.A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.to(pair.B.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    rewritten = {k: v for k, v in config.items() if k not in ("alpha_pattern", "rank_pattern")}
    rewritten.update(use_rslora=False, alpha_pattern={}, rank_pattern={})
    (out / "adapter_config.json").write_text(json.dumps(rewritten, indent=2))
    torch.save(tensors, out / "adapter_model.bin")
    return {"rank": rank, "lora_alpha": config["lora_alpha"], "rescaled_modules": len(rescaled),
            "was_rslora": bool(config.get("use_rslora")), "tensors": len(tensors)}  # fmt: skip


def check_adapter(name: str, original: Path, rewritten: Path) -> float:
    """Reload the `.bin` safely and compare DashInfer's ΔW (alpha/r · B @ A) with the trained one."""
    import torch

    loaded = torch.load(rewritten / "adapter_model.bin", map_location="cpu", weights_only=True)
    config = json.loads((rewritten / "adapter_config.json").read_text())
    plain = config["lora_alpha"] / config["r"]
    trained_config, pairs = read_adapter(original)
    worst = 0.0
    for pair in pairs.values():
        prefix = f"base_model.model.{pair.module}"
        served = plain * loaded[f"{prefix}.lora_B.weight"].float() @ loaded[f"{prefix}.lora_A.weight"].float()
        trained = module_scale(trained_config, pair.module, pair.A.shape[0]) * pair.B.float() @ pair.A.float()
        denominator = float(trained.abs().max()) or 1.0
        worst = max(worst, float((served - trained).abs().max()) / denominator)
    if worst > 1e-5:
        raise FtdError(f"adapter {name}: DashInfer's ΔW would differ from the trained one by {worst:.1e} (relative)")
    return worst


def write_bundle(base_dir: Path, adapters: list[tuple[str, Path]], options: dict, precision: str, out: Path) -> dict:
    loras = {}
    for name, peft_dir in adapters:
        info = rewrite_adapter(name, peft_dir, out / "loras" / name)
        info["max_delta_rel_error"] = check_adapter(name, peft_dir, out / "loras" / name)
        loras[name] = info
    for item in base_dir.iterdir():
        if item.is_file() and item.name != "ftd-manifest.json":
            link_or_copy(item, out / "hf_model" / item.name)
    max_rank = options.get("lora_max_rank") or max(info["rank"] for info in loras.values())
    manifest = {
        "format": "ftd-dashinfer-lora/1",
        "data_type": {"fp16": "float16", "bf16": "bfloat16"}[precision],
        "lora_max_num": options.get("lora_max_num") or len(loras),
        "lora_max_rank": max_rank,
        "max_length": options["max_length"],
        "max_batch": options["max_batch"],
        "adapters": loras,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / LAUNCH).write_text(launch_script(manifest))
    (out / "README.md").write_text(readme(manifest))
    return manifest


def launch_script(manifest: dict) -> str:
    names = sorted(manifest["adapters"])
    return f'''"""Serve hf_model/ with every adapter in loras/ through DashInfer 2.x on an NVIDIA GPU.

Written by ftd. Mirrors DashInfer's LoRA guide: serialize the base with lora_cfg, set the runtime
LoRA limits, load each adapter, pick one per request with gen_cfg["lora_name"].

    pip install dashinfer  # 2.x, CUDA, CPython <= 3.10
    python {LAUNCH} --lora {names[0]} --prompt "..."
"""

import argparse
import os

from dashinfer import allspark
from dashinfer.allspark._allspark import AsStatus
from dashinfer.allspark.engine import TargetDevice

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_NAME = "ftd_model"
LORA_NAMES = {names!r}
DATA_TYPE = {manifest["data_type"]!r}
LORA_MAX_NUM = {manifest["lora_max_num"]}
LORA_MAX_RANK = {manifest["lora_max_rank"]}
MAX_LENGTH = {manifest["max_length"]}
MAX_BATCH = {manifest["max_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora", choices=LORA_NAMES, required=True)
    parser.add_argument("--prompt", required=True, help="already formatted with the adapter's chat template")
    parser.add_argument("--device-ids", default="0")
    parser.add_argument("--output-dir", default=os.path.join(HERE, "dashinfer_model"))
    args = parser.parse_args()

    loader = allspark.HuggingFaceModel(os.path.join(HERE, "hf_model"), MODEL_NAME, user_set_data_type=DATA_TYPE,
                                       in_memory_serialize=False, trust_remote_code=False)
    engine = allspark.Engine()
    lora_cfg = {{"input_base_dir": os.path.join(HERE, "loras"), "lora_names": LORA_NAMES, "lora_only": False}}
    (loader.load_model().read_model_config()
     .serialize_to_path(engine, args.output_dir, enable_quant=False, weight_only_quant=False, lora_cfg=lora_cfg,
                        skip_if_exists=True)
     .free_model())
    devices = [int(d) for d in args.device_ids.split(",")]
    builder = loader.create_reference_runtime_config_builder(MODEL_NAME, TargetDevice.CUDA, devices,
                                                             max_batch=MAX_BATCH)
    builder.max_length(MAX_LENGTH).lora_max_num(LORA_MAX_NUM).lora_max_rank(LORA_MAX_RANK)
    runtime_cfg = builder.build()
    engine.install_model(runtime_cfg)
    engine.start_model(MODEL_NAME)
    for name in LORA_NAMES:
        status = engine.load_lora(MODEL_NAME, name)
        if status != AsStatus.ALLSPARK_SUCCESS:
            raise SystemExit(f"load_lora({{name!r}}) failed: {{status}}")
    gen_cfg = loader.create_reference_generation_config_builder(runtime_cfg)
    gen_cfg.update({{"top_k": 1, "repetition_penalty": 1.0, "lora_name": args.lora}})
    status, handle, queue = engine.start_request_text(MODEL_NAME, loader, args.prompt, gen_cfg)
    engine.sync_request(MODEL_NAME, handle)
    generated = queue.Get().ids_from_generate
    print(loader.init_tokenizer().get_tokenizer().decode(generated))
    engine.release_request(MODEL_NAME, handle)
    engine.stop_model(MODEL_NAME)
    engine.release_model(MODEL_NAME)


if __name__ == "__main__":
    main()
'''


def readme(manifest: dict) -> str:
    rows = "\n".join(
        f"| {n} | {a['rank']} | {a['lora_alpha']} | {'yes (rescaled into B)' if a['was_rslora'] else 'no'} |"
        for n, a in sorted(manifest["adapters"].items())
    )
    return f"""# DashInfer multi-LoRA bundle

`hf_model/` (the base) and `loras/<name>/` (`adapter_config.json` + `adapter_model.bin`, tensors
only) in the layout DashInfer's LoRA converter reads; `{LAUNCH}` serializes the base with
`lora_cfg`, sets `lora_max_num({manifest["lora_max_num"]})` and `lora_max_rank({manifest["lora_max_rank"]})`, loads
every adapter and answers one prompt with the adapter you name. Needs dashinfer 2.x on an NVIDIA
GPU (CPython ≤ 3.10); data type {manifest["data_type"]}.

| adapter | r | lora_alpha | rsLoRA |
|---|---|---|---|
{rows}

DashInfer applies `lora_alpha / r`; adapters trained with rsLoRA or per-module alphas have that
difference folded into B, so the served update equals the trained one (checked per module).
"""


# ---------------------------------------------------------------- the cached stage

STAGE = "dashinfer-lora"


def bundle_key(base, adapters: list, target) -> str:
    return stage_key(
        STAGE,
        code=code_version(__file__),
        config=target.model_dump(mode="json", exclude={"name", "thresholds"}),
        inputs=[base.key, *[a.key for a in adapters]],
        libraries=library_versions("torch", "safetensors"),
    )


def assemble(base, adapters: list, target, store):
    """Stage: the DashInfer 2.x multi-LoRA bundle over the base model for every adapter."""

    def build(tmp: Path) -> dict:
        pairs = [(a.meta["adapter_name"], adapter_dir(a, store)) for a in adapters]
        manifest = write_bundle(model_dir(base), pairs, options_of(target).model_dump(), target.precision, tmp)
        worst = max(a["max_delta_rel_error"] for a in manifest["adapters"].values())
        return {"target": target.name, "backend": target.backend, "adapters": sorted(manifest["adapters"]),
                "checks": {"adapters_checked": len(pairs), "max_delta_rel_error": worst,
                           "bin_reloaded_weights_only": True}}  # fmt: skip

    return store.materialize(STAGE, bundle_key(base, adapters, target), build, lineage={"base": base.key})
