"""Import an existing PEFT adapter directory as an adapter artifact, checked against the base.

The adapter's tensors are loaded safely (safetensors, or a legacy `.bin` with
`weights_only=True`), checked to fit the base model's weights shape by shape (read from the
safetensors headers, no weights loaded), and stored as safetensors beside the base tokenizer,
so later stages treat imported and trained adapters the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ftd.config import AdapterConfig
from ftd.errors import ConfigError, FtdError
from ftd.integrity import check_safetensors
from ftd.store import Artifact, Store, code_version, library_versions, stage_key, tree_digest
from tasks.base_model import model_dir
from tasks.merge import LORA_KEY, TOKENIZER_FILES, load_adapter_tensors, module_scale, read_adapter, weight_shapes
from tasks.modeling import load_tokenizer
from tasks.sft import BASE_RECORD, STAGE


def import_key(base: Artifact, adapter: AdapterConfig) -> str:
    return stage_key(
        STAGE,
        code=code_version(__file__),
        config={"chat_template": adapter.data.chat_template},
        inputs=[base.key, tree_digest(Path(adapter.import_from))],
        libraries=library_versions("safetensors", "torch"),
    )


def import_adapter(base: Artifact, adapter: AdapterConfig, store: Store) -> Artifact:
    source = Path(adapter.import_from)

    def build(tmp: Path) -> dict:
        from safetensors.torch import save_file

        config, pairs = read_adapter(source)
        check_fits_base(pairs, model_dir(base), source, base.meta.get("source", "the base model"))
        out = tmp / "adapter"
        out.mkdir()
        tensors = {f"base_model.model.{p.module}.lora_{ab}.weight": getattr(p, ab).contiguous()
                   for p in pairs.values() for ab in "AB"}  # fmt: skip
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        tokenizer = load_tokenizer(model_dir(base), chat_template=adapter.data.chat_template)
        tokenizer.save_pretrained(out)
        for name in TOKENIZER_FILES:  # keep the base's own files where the tokenizer did not write one
            if (model_dir(base) / name).is_file() and not (out / name).exists():
                shutil.copy2(model_dir(base) / name, out / name)
        ranks = sorted({p.A.shape[0] for p in pairs.values()})
        return {
            "adapter_name": adapter.name,
            "imported_from": str(source),
            "recorded_base": config.get("base_model_name_or_path"),
            "ranks": ranks,
            "target_modules": sorted({p.module.rsplit(".", 1)[-1] for p in pairs.values()}),
            "scale": module_scale(config, next(iter(pairs.values())).module, ranks[0]),
            "loss_curve": [],
        }

    return store.materialize(
        STAGE, import_key(base, adapter), build, lineage={"base": base.key, "imported": str(source)}
    )


def check_base_record(adapter: AdapterConfig, base: Artifact) -> None:
    """An adapter ftd trained carries `ftd-base.json`: refuse it on any other base, even one of the
    same shapes (a retrained or different checkpoint of the same architecture)."""

    if adapter.import_from is None or not (Path(adapter.import_from) / BASE_RECORD).is_file():
        return
    record_path = Path(adapter.import_from) / BASE_RECORD
    record = json.loads(record_path.read_text())
    if record.get("base_key") != base.key:
        raise FtdError(
            f"adapters.{adapter.name}.import_from: {adapter.import_from} was trained on base "
            f"{record.get('base_source')!r} (key {str(record.get('base_key'))[:12]}), but this experiment's base is "
            f"{base.meta.get('source')!r} (key {base.key[:12]}): use that base model, or retrain the adapter"
        )


def header_shapes_fit(
    adapter_path: Path, base_shapes: dict[str, tuple[int, ...]], architecture: str, field: str
) -> None:
    """Pre-flight: the adapter's LoRA shapes (from its safetensors header, no weights read) against
    the base model's weight shapes."""

    file = Path(adapter_path) / "adapter_model.safetensors"
    try:
        if file.is_file():
            header = check_safetensors(file)
        else:  # a legacy .bin (small): loaded with weights_only=True now, so a pickle is refused before compute
            header = {n: (str(t.dtype), tuple(t.shape)) for n, t in load_adapter_tensors(Path(adapter_path)).items()}
    except FtdError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    for name, (_dtype, shape) in header.items():
        match = LORA_KEY.match(name)
        if not match or len(shape) != 2:
            continue
        weight = f"{match['module']}.weight"
        base_name = next(
            (n for n in base_shapes if n == weight or n.endswith("." + weight) or weight.endswith("." + n)), None
        )
        if base_name is None:
            raise ConfigError(f"{field}: adapter module {match['module']} does not exist in {architecture}")
        out_features, in_features = base_shapes[base_name]
        got = shape[1] if match["ab"] == "A" else shape[0]
        want = in_features if match["ab"] == "A" else out_features
        if got != want:
            raise ConfigError(
                f"{field}: adapter tensor {name} has {got} {'input' if match['ab'] == 'A' else 'output'} features but "
                f"{architecture}'s {base_name} has {want}: the adapter was trained on another base model"
            )


def check_fits_base(pairs: dict, base_dir: Path, adapter_path: Path, base_name: str) -> None:
    """Every LoRA update must have the shape of the base weight it updates."""
    shapes = weight_shapes(base_dir)
    for weight, pair in pairs.items():
        name = next((n for n in shapes if n == weight or n.endswith("." + weight) or weight.endswith("." + n)), None)
        if name is None:
            raise FtdError(f"{adapter_path}: adapter module {pair.module} does not exist in {base_name}")
        expected = shapes[name]
        got = (pair.B.shape[0], pair.A.shape[1])
        if tuple(expected) != got and tuple(expected[::-1]) != got:
            raise FtdError(
                f"{adapter_path}: adapter module {pair.module} updates a {got[0]}x{got[1]} weight but {base_name} "
                f"has {expected[0]}x{expected[1]}: the adapter was trained on another base model"
            )
