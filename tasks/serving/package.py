"""An engine folder as an MLflow Model (pyfunc, "models from code"): what `mlflow.pyfunc.load_model`,
`mlflow models serve` and `ftd chat` load. Written at registration, into the folder that is
logged for the version, so the engine is stored once, inside the model."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ftd
import tasks
from ftd import builtin_models
from ftd.config import TargetConfig

CHAT_MODEL = Path(__file__).with_name("chat_model.py")
ADAPTER_MODEL = Path(__file__).with_name("adapter_model.py")
ADAPTER_LIBRARIES = ("torch", "peft", "safetensors", "accelerate", "huggingface-hub")
# What the chat model imports itself, besides its backend's libraries; pinned to what is installed.
SERVING_LIBRARIES = ("mlflow", "numpy", "pydantic", "pyyaml", "transformers", "tokenizers", "jinja2")
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    tokenizer_dir: Path  # the tokenizer (and chat template) the adapter was trained with
    eos: list[int]  # every id that ends an answer, as the gate used them


def requirements(libraries: tuple[str, ...]) -> list[str]:
    """Explicit pins (MLflow would otherwise infer them by loading the model in a subprocess)."""
    pins = []
    for name in dict.fromkeys((*SERVING_LIBRARIES, *libraries)):
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            continue  # optional for this engine (e.g. optimum for a builder-made graph)
    return pins


def context_length(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    return int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)


def write_chat_model(out: Path, engine_dir: Path, target: TargetConfig, adapters: list[ServedAdapter],
                     model_dir: Path, model_name: str, libraries: tuple[str, ...],
                     engine_context: int | None = None) -> None:  # fmt: skip
    """Write the MLflow Model folder `out` (which must not exist) for `engine_dir`; requests are
    limited to the model's context, or the engine's (`engine_context`) where it is shorter."""
    limit = min(context_length(model_dir), engine_context or context_length(model_dir))
    spec = {"target": target.model_dump(mode="json"), "context_length": limit}
    _save(out, CHAT_MODEL, engine_dir, spec, adapters, model_name, libraries)


def write_adapter_model(out: Path, adapter: ServedAdapter, adapter_path: Path, base: dict, model_dir: Path,
                        model_name: str) -> None:  # fmt: skip
    """The PEFT adapter as an MLflow Model: its own files, and `base` (source, revision,
    weights_digest, trust_remote_code) by reference, checked when the model is loaded."""
    spec = {"base": base, "context_length": context_length(model_dir)}
    # a builtin base is rebuilt where the model is loaded: its tokenizer's corpus travels with it
    extra = {"corpus": str(builtin_models.CORPUS)} if base["source"].startswith("builtin:") else {}
    _save(out, ADAPTER_MODEL, adapter_path, spec, [adapter], model_name, ADAPTER_LIBRARIES, extra)


def _save(out: Path, python_model: Path, engine_dir: Path, spec: dict, adapters: list[ServedAdapter],
          model_name: str, libraries: tuple[str, ...], extra_artifacts: dict | None = None) -> None:  # fmt: skip
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for a in adapters:
            shutil.copytree(a.tokenizer_dir, work / "tokenizers" / a.name, ignore=_not_tokenizer)
        spec = {"format": 1, "model": model_name, **spec,
                "adapters": {a.name: {"tokenizer": a.name, "eos": list(a.eos)} for a in adapters}}  # fmt: skip
        (work / "serving.json").write_text(json.dumps(spec, indent=2))
        code = []
        for package in (ftd, tasks):  # the source this version was gated with, without caches
            source = Path(package.__file__).parent
            shutil.copytree(source, work / "code" / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code.append(str(work / "code" / source.name))
        first = next(iter(spec["adapters"]))
        example = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 1.0, "n": 1,
                   "stream": False,
                   **({"custom_inputs": {"adapter": first}} if len(adapters) > 1 else {})}  # fmt: skip
        mlflow.pyfunc.save_model(  # MLflow runs the example once: a version that cannot answer is not registered
            path=str(out), python_model=str(python_model), code_paths=code, pip_requirements=requirements(libraries),
            input_example=example,
            artifacts={"engine": str(engine_dir), "serving": str(work / "serving.json"),
                       "tokenizers": str(work / "tokenizers"), **(extra_artifacts or {})},
        )  # fmt: skip


def _not_tokenizer(directory: str, names: list[str]) -> list[str]:
    """Copy only a tokenizer's files from an adapter folder (not its weights)."""
    keep = ("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template", "added_tokens")
    return [n for n in names if not n.startswith(keep)]
