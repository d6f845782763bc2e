"""The experiment config: one typed schema, loaded from YAML plus `--set key.path=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key fails with its full
path (and a suggestion) before anything is computed. Stages receive only their own section, so
their cache keys change only when that section does.
"""

from __future__ import annotations

import difflib
import re
from os import PathLike
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftd.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# File types that `format` used to name, and the `builder` each is now.
_FILE_TYPES = {"auto": "auto", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


class DataConfig(Section):
    """Where the instruction data is and how to read it.

    `train` and `eval` are what `datasets.load_dataset` accepts: a file, a glob of files, a local
    folder (`save_to_disk` output or data files) or a hub dataset id (`revision`, `split`). `format`
    names the instruction layout; `builder` the file type, inferred from the source by default."""

    train: str = Field(..., description="A file, a glob of files, a local folder or a hub dataset id.")
    eval: str | None = Field(None, description="Held-out split; if absent, eval_fraction of train.")
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    format: Literal["messages", "alpaca", "sharegpt", "prompt_response"] = Field(
        "messages", description="The instruction layout of each row."
    )
    builder: Literal["auto", "json", "csv", "parquet", "arrow"] = Field(
        "auto", description="The file type; auto: from the source, as datasets infers it."
    )
    revision: str | None = Field(None, description="A hub dataset's revision; pin a commit for the up-to-date check.")
    split: str = Field("train", min_length=1, description="The train source's split, with slicing: train[:2000].")
    eval_split: str = Field("train", min_length=1, description="The eval source's split.")
    turns: Literal["last", "all"] = Field(
        "last", description="Multi-turn conversations: train on the last assistant turn, or on every one."
    )
    messages_field: str | None = Field(
        None, description="messages/sharegpt: the conversation column (default messages / conversations)."
    )
    prompt_field: str | None = Field(None, description="prompt_response: the prompt column...")
    response_field: str | None = Field(None, description="...and the response column.")
    system_prompt: str | None = None
    chat_template: str | None = Field(None, description="Jinja template; default: the tokenizer's.")
    overlong: Literal["warn", "truncate", "drop"] = Field(
        "warn",
        description="Train rows longer than the adapter's sft.max_length tokens: warn (kept; training truncates "
        "them), truncate (kept, silently) or drop (left out of train.jsonl; eval rows are always kept).",
    )
    seed: int = 0

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _source_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, PathLike) else v

    @field_validator("format", mode="before")
    @classmethod
    def _not_a_file_type(cls, v: Any) -> Any:
        """`format` named the file type before it named the layout: say where that setting went."""
        if v in _FILE_TYPES:
            raise ValueError(
                f"{v!r} is a file type: use `builder: {_FILE_TYPES[v]}` instead (`format` now names the "
                "instruction layout: messages, alpaca, sharegpt or prompt_response)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _prompt_fields_imply_the_format(cls, data: Any) -> Any:
        """Configs written before `format` named the layout chose prompt/response by its fields."""
        if isinstance(data, dict) and "format" not in data and data.get("prompt_field") is not None:
            return {**data, "format": "prompt_response"}
        return data

    @model_validator(mode="after")
    def _one_layout(self) -> DataConfig:
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("set both prompt_field and response_field, or neither")
        if self.prompt_field is not None and self.format != "prompt_response":
            raise ValueError(f"prompt_field and response_field are for format prompt_response, not {self.format}")
        if self.eval is not None and (self.eval, self.eval_split) == (self.train, self.split):
            raise ValueError("eval is the same source and split as train: set eval_split (e.g. test)")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns each row must have, for this format."""
        if self.format == "alpaca":
            return ("instruction", "output")
        if self.format == "prompt_response":
            return (self.prompt_field or "prompt", self.response_field or "response")
        return (self.messages_field or ("conversations" if self.format == "sharegpt" else "messages"),)


class LoraSettings(Section):
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)


class SftSettings(Section):
    max_steps: int = Field(-1, description="-1: train for `epochs` instead.")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    packing: bool = False
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    logging_steps: int = Field(10, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    save_steps: int = Field(
        100, ge=0, description="Checkpoint every N steps; a killed run resumes from the last one (0: never)."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Data-parallel training processes (torchrun: one per GPU, or gloo on CPU). Each "
        "takes `batch_size` rows per step, so the effective batch grows with it.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass to save memory. Default: on for GPU "
        "training, off on CPU, where memory is plentiful and it costs ~30% of the throughput "
        "(TRL turns it on everywhere).",
    )

    # Settings that change how training is run, not what it produces: not part of the cache key.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"save_steps", "gradient_checkpointing"})

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (use epochs) or a positive number of steps")
        return v


class AdapterConfig(Section):
    """One LoRA adapter: trained by SFT on its own data with its own LoRA settings, or imported
    from an existing PEFT directory (then only the data's eval split is used, for the smoke test)."""

    name: Name
    data: DataConfig
    import_from: Path | None = Field(None, description="An existing PEFT adapter directory to use instead of SFT.")
    lora: LoraSettings = LoraSettings()
    sft: SftSettings = SftSettings()

    @model_validator(mode="after")
    def _import_or_train(self) -> AdapterConfig:
        if self.import_from is not None and {"lora", "sft"} & self.model_fields_set:
            raise ValueError(
                "an imported adapter (import_from) takes its LoRA settings from its own "
                "adapter_config.json: remove `lora` and `sft`"
            )
        return self


class MergeSettings(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto keeps each tensor's stored dtype."
    )
    max_shard_mb: int = Field(2048, gt=0)


class Thresholds(Section):
    min_accuracy: float = Field(0.9, ge=0, le=1, description="Eval accuracy of the trained model.")
    min_agreement: float = Field(0.95, ge=0, le=1, description="Greedy agreement of every pair.")
    max_logit_diff: float = Field(1e-3, gt=0, description="Max |Δlogit| where both expose logits.")


class TargetConfig(Section):
    """One deployment target: an engine per adapter built from merged weights (`merged`), or one
    base engine serving every adapter of the experiment (`multi_lora`)."""

    name: Name
    backend: str = "onnx_genai"
    mode: Literal["merged", "multi_lora"] = "merged"
    precision: str = "fp32"
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific options.")
    thresholds: Thresholds | None = Field(None, description="Gate thresholds for this target (default: smoke's).")


class SmokeSettings(Section):
    max_prompts: int = Field(64, gt=0, description="Eval prompts used (first N of the eval split).")
    prompts: list[str] = Field(default_factory=list, description="Extra prompts (no expected answer).")
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(
        16, gt=0, description="Prompts the PyTorch references decode at once (left-padded); fewer holds less "
        "activation memory, more takes fewer forward passes.",
    )
    include_base: bool = Field(True, description="Also score the base model (accuracy before SFT).")
    served: bool = Field(
        False,
        description="Also gate every servable version through MLflow's scoring server (HTTP) before it is "
        "registered: its answers must equal the gate's engine tokens (one server start per version).",
    )
    thresholds: Thresholds = Thresholds()


class TrackingSettings(Section):
    uri: str | None = Field(None, description="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite in artifacts.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the experiment name.")
    adapter_model: str = "{experiment}-adapter"
    engine_model: str = "{experiment}-{target}"


class ExperimentConfig(Section):
    experiment: Name
    base_model: str = Field(..., description="builtin:NAME, a local HF directory, or a hub id.")
    revision: str | None = None
    trust_remote_code: bool = False
    artifacts_dir: Path = Path("artifacts")
    adapters: list[AdapterConfig] = Field(..., min_length=1)
    merge: MergeSettings = MergeSettings()
    targets: list[TargetConfig] = Field(default_factory=lambda: [TargetConfig(name="onnx-fp32")])
    smoke: SmokeSettings = SmokeSettings()
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="after")
    def _unique_names(self) -> ExperimentConfig:
        for field, items in (("adapters", self.adapters), ("targets", self.targets)):
            names = [item.name for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: names must be unique, repeated: {', '.join(dupes)}")
        return self


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read YAML, apply overrides, validate. Relative data paths resolve against the YAML's folder's
    project root (the current directory) — configs are meant to be run from the repository root."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict, source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    messages = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            messages.append(f"unknown key `{loc}`{_suggest(err['loc'])}")
        elif err["type"] == "missing":
            messages.append(f"missing required key `{loc}`")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            messages.append(f"`{loc or 'config'}`: {err['msg']}{got_text}")
    return "; ".join(messages)


def _suggest(loc: tuple) -> str:
    """'did you mean' for a misspelt key, found by walking the schema along the key's path."""
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    fields = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


_OVERRIDE = re.compile(r"^([A-Za-z0-9_.\-]+)=(.*)$", re.S)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.0.c=value`: value parsed as YAML (so numbers, booleans and lists work)."""
    match = _OVERRIDE.match(item)
    if not match:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    keys, value_text = match.group(1).split("."), match.group(2)
    try:
        value = yaml.safe_load(value_text) if value_text else ""
    except yaml.YAMLError:
        value = value_text
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        node = _step(node, key, keys[: depth + 1], create=True)
    last = keys[-1]
    if isinstance(node, list) and last == str(len(node)):
        node.append(value)  # `targets.2={...}` with two targets adds a third
    elif isinstance(node, list):
        node[_index(node, last, keys)] = value
    else:
        node[last] = value


def _step(node: Any, key: str, path: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"override `{'.'.join(path)}`: `{'.'.join(path[:-1])}` is not a mapping")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def _index(node: list, key: str, path: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override `{'.'.join(path)}`: index {key} out of range (list has {len(node)} items)")
    return int(key)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Config as flat `a.b.c -> str` pairs (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{v.get('name', i)}."))
    else:
        out[prefix.rstrip(".")] = str(data)
    return out
