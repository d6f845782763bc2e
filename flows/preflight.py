"""Check everything a run needs before any compute starts.

Config schema errors are caught when the YAML is loaded; this module checks what the config
*points at*: data files and their columns, the base model, target modules that the model really
has, backends that exist and accept the architecture, and a reachable tracking server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftd import builtin_models
from ftd.config import ExperimentConfig
from ftd.errors import ConfigError, FtdError
from ftd.integrity import check_weight_dir
from ftd.memory import machine_memory_bytes
from ftd.store import code_version
from tasks.adapter_import import header_shapes_fit
from tasks.backends.registry import get_backend
from tasks.base_model import BaseSpec, parse_base
from tasks.data import check_data

SAMPLE_ROWS = 200  # first rows of each data source checked (with its schema) before any compute


@dataclass(frozen=True)
class Plan:
    base: BaseSpec
    architecture: str


def preflight(cfg: ExperimentConfig) -> Plan:
    spec = parse_base(cfg.base_model, cfg.revision)
    for adapter in cfg.adapters:
        check_data(adapter.data, f"adapters.{adapter.name}.data", SAMPLE_ROWS)
    if spec.kind == "local":
        try:
            check_weight_dir(Path(spec.name))
        except FtdError as exc:
            raise ConfigError(f"base_model: {exc}") from None
    inspection_file, inspection = _cached_inspection(spec, cfg)
    architecture, modules, model_config, shapes = inspection or _inspect_base(spec, cfg.trust_remote_code)
    for adapter in cfg.adapters:
        field, targets = f"adapters.{adapter.name}.lora.target_modules", adapter.lora.target_modules
        if adapter.import_from is not None:
            field = f"adapters.{adapter.name}.import_from"
            targets = _imported_targets(adapter.import_from, field)
        if adapter.import_from is not None:
            header_shapes_fit(adapter.import_from, shapes, architecture, field)
        unknown = [m for m in targets if m not in modules]
        if unknown:
            raise ConfigError(
                f"{field}: {unknown} not in {architecture} (its linear modules: {', '.join(sorted(modules))})"
            )
    summaries = [_adapter_summary(a) for a in cfg.adapters]
    for target in cfg.targets:
        get_backend(target.backend).validate(target, architecture, model_config, summaries)
    check_memory(cfg, model_config, shapes, machine_memory_bytes())
    if inspection is None and inspection_file is not None:  # only once every check has passed
        _save_inspection(inspection_file, architecture, modules, model_config, shapes)
    return Plan(base=spec, architecture=architecture)


# What a stage needs besides the model it holds: the interpreter with torch, transformers, Prefect
# and MLflow imported, and the activations of a 16-prompt batch (measured: bench/results/scale.md).
RUNTIME_BYTES = 1_500_000_000
STORED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_memory(cfg: ExperimentConfig, model_config: dict, shapes: dict, total: int | None) -> None:
    """Refuse, before anything trains, a run whose gate cannot fit this machine's memory: the
    PyTorch reference holds one model in its stored dtype (plus its output layer in fp32 for a
    moment); each engine that runs here holds its weights. Merging, converting and quantising
    stream and need far less (docs/backends.md has the measured figures per stage)."""
    if total is None:
        return
    tied = model_config.get("tie_word_embeddings", False)
    parameters = sum(a * b for name, (a, b) in shapes.items() if not (tied and name.startswith("lm_head")))
    dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32").removeprefix("torch.")
    stored = parameters * STORED_BYTES.get(dtype, 4)
    vocab, hidden = int(model_config.get("vocab_size") or 0), int(model_config.get("hidden_size") or 0)
    gb = 1e9
    reference = stored + vocab * hidden * 4 + RUNTIME_BYTES
    if reference > total:
        raise ConfigError(
            f"base_model: the parity gate's PyTorch reference holds the {parameters / 1e9:.2f}B-parameter model "
            f"({stored / gb:.1f} GB in {dtype}) and needs ~{reference / gb:.1f} GB; this machine has {total / gb:.1f} GB"
        )
    for target in cfg.targets:
        backend = get_backend(target.backend)
        engine = backend.engine_bytes(target, parameters)
        if engine is None or engine + RUNTIME_BYTES <= total:
            continue
        if backend.unavailable_reason(target) or backend.smoke_unavailable_reason(target):
            continue  # not run here: built (or written) elsewhere
        raise ConfigError(
            f"targets.{target.name}: its {target.precision} engine of this {parameters / 1e9:.2f}B-parameter model holds "
            f"~{engine / gb:.1f} GB when the gate runs it (~{(engine + RUNTIME_BYTES) / gb:.1f} GB in all); this machine "
            f"has {total / gb:.1f} GB: choose a 4-bit or 8-bit precision, or run this target on a larger machine"
        )


def _cached_inspection(spec: BaseSpec, cfg: ExperimentConfig) -> tuple[Path | None, tuple | None]:
    """The base model's inspection from an earlier run, keyed by the config's content.

    Inspecting builds a meta-device model, which means importing transformers' modeling code: ~4 s
    that a rerun would otherwise pay before it can find that every step is cached. The key is the
    model config's bytes (or the builtin's code), transformers' version and trust_remote_code;
    a hub model's config must be fetched for it, so hub bases are always inspected."""
    import hashlib
    import json
    from importlib.metadata import version

    if spec.kind == "builtin":
        content = f"{spec.name}:{code_version(builtin_models.__file__)}".encode()
    elif spec.kind == "local" and (Path(spec.name) / "config.json").is_file():
        content = (Path(spec.name) / "config.json").read_bytes()
    else:
        return None, None
    key = hashlib.sha256(b"\0".join([content, version("transformers").encode(), str(cfg.trust_remote_code).encode()]))
    path = Path(cfg.artifacts_dir) / "cache" / "preflight" / f"{key.hexdigest()[:24]}.json"
    try:
        data = json.loads(path.read_text())
        shapes = {name: tuple(shape) for name, shape in data["shapes"].items()}
        return path, (data["architecture"], set(data["modules"]), data["config"], shapes)
    except (OSError, ValueError, KeyError):
        return path, None


def _save_inspection(path: Path, architecture: str, modules: set[str], config: dict, shapes: dict) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    record = {"architecture": architecture, "modules": sorted(modules), "config": config, "shapes": shapes}
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(path)


def _adapter_summary(adapter) -> dict:
    """Name, target modules and largest rank, from the config (trained) or adapter_config.json (imported)."""
    if adapter.import_from is None:
        return {"name": adapter.name, "modules": list(adapter.lora.target_modules), "max_rank": adapter.lora.r}
    import json

    config = json.loads((Path(adapter.import_from) / "adapter_config.json").read_text())
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    targets = config.get("target_modules") or []
    return {
        "name": adapter.name,
        "modules": [] if isinstance(targets, str) else list(targets),
        "max_rank": max(ranks),
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": list(config.get("modules_to_save") or []),
    }


def _imported_targets(path: Path, field: str) -> list[str]:
    import json

    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{field}: {path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        targets = json.loads(config_file.read_text()).get("target_modules") or []
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_file}: not valid JSON ({exc.msg})") from None
    # A regex (str) cannot be listed here; the import stage checks every tensor's shape instead.
    return [] if isinstance(targets, str) else list(targets)


def _inspect_base(spec: BaseSpec, trust_remote_code: bool) -> tuple[str, set[str], dict, dict]:
    """Architecture, linear-module names, the config as a dict and every weight's shape, from the
    config alone (a meta-device model: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.kind == "builtin":
        config = builtin_models.make_config(builtin_models.BUILTINS[spec.name])
    else:
        source = spec.name
        if spec.kind == "hub":
            source = _fetch_config(spec)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }
    architecture = (config.architectures or [type(model).__name__])[0]
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items() if p.ndim == 2}
    return architecture, modules, {**config.to_dict(), "architectures": [architecture]}, shapes


def _fetch_config(spec: BaseSpec) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return str(Path(hf_hub_download(spec.name, "config.json", revision=spec.revision)).parent)
    except Exception as exc:
        raise FtdError(
            f"base_model: cannot read {spec.name!r} from the hub ({type(exc).__name__}); "
            "check the id, your network, or use a local directory"
        ) from None
