"""The backend contract: what every serving backend implements, with defaults for the common case.

A backend is asked four things, in this order:

1. **At pre-flight** (`validate`, before anything trains): does it accept this target — its mode,
   its `options` (a pydantic schema), the base model's architecture and shape (`check_model`),
   the adapters' ranks and counts (`check_adapters`)? Every refusal is a `ConfigError` naming the
   field and what is expected.
2. **Can it run here** (`unavailable_reason`)? A missing GPU or package gives the reason the
   target is skipped; a skipped step is never cached and never reported as built.
3. **`deploy(ctx, target, adapters)`**: plan and run its own stages (convert, quantise, build,
   bundle) through `ctx.run`, which caches each one and records it for the run report. It returns
   one typed `Deployment` per adapter: `READY` for the parity gate, `VERIFIED_ONLY` (written and
   checked here, but its engine cannot run here: `smoke_unavailable_reason`), or `SKIPPED`.
4. **`open(engine_dir, target, adapter)`**: a runtime that decodes greedily, for the smoke test.

The flow runs the gate on every `READY` deployment (`PASSED` or `FAILED`); registration and the
report read only `Deployment.status`. The default `deploy` builds one engine per adapter from
its merged model (`build`): a merged-only backend implements `build` and `open` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from ftd.config import ExperimentConfig, TargetConfig, describe_validation_error
from ftd.errors import ConfigError, GateFailed
from ftd.orchestration import StageLog, StageTask
from ftd.store import Artifact, Store
from tasks.backends.runtime import Engine
from tasks.orchestrated import build_task

OptionsT = TypeVar("OptionsT", bound=BaseModel)
# Weight bytes per parameter of an engine at each precision name the backends use (4-bit formats
# carry a scale per block of 32: ~0.56-0.63; q8_0: 34 bytes per 32 weights).
BYTES_PER_PARAMETER = {"fp32": 4.0, "f32": 4.0, "fp16": 2.0, "bf16": 2.0, "f16": 2.0, "int8": 1.06, "q8_0": 1.06,
                       "q5_k_m": 0.69, "int4": 0.63, "q4_0": 0.56, "q4_k_m": 0.6}  # fmt: skip


class Status(StrEnum):
    READY = "ready"  # built; the gate has not run yet
    PASSED = "passed"  # the parity gate passed
    FAILED = "failed"  # the parity gate failed: nothing of this target is registered
    VERIFIED_ONLY = "verified-only"  # written and checked here; its engine cannot run here
    SKIPPED = "skipped"  # not built here (no GPU, no package): the reason says what is missing


@dataclass
class AdapterChain:
    """One adapter's chain up to its PyTorch reference outputs, as every backend receives it."""

    name: str
    data: Artifact
    adapter: Artifact
    merged: Artifact
    reference: Artifact


@dataclass
class Deployment:
    """One target for one adapter: a merged engine, or a bundle serving several adapters with this
    one active. Its status is the only thing registration and the report decide on."""

    target: TargetConfig
    adapter: str
    engine: Artifact
    status: Status
    reason: str = ""  # why skipped / verified only
    smoke: Artifact | None = None
    failure: GateFailed | None = None

    @property
    def registrable(self) -> bool:
        return self.status in (Status.PASSED, Status.VERIFIED_ONLY)

    @property
    def adapter_failed(self) -> bool:
        """The gate failed on the PyTorch models themselves (the adapter's accuracy, or the merge
        against the unmerged adapter): the adapter is at fault, not this engine."""
        return self.failure is not None and bool(self.failure.report.get("adapter_failures"))

    @property
    def complete(self) -> bool:
        """Everything this target asks for ran here; anything else must be tried again elsewhere."""
        return self.status is Status.PASSED


@dataclass
class DeployContext:
    """What the flow hands each backend: the run's config and base model, the store, and the stage
    runner (`run`: a cached Prefect task, recorded for the report)."""

    cfg: ExperimentConfig
    architecture: str
    base: Artifact
    store: Store
    stages: StageLog

    def run(self, task: StageTask, label: str, **kwargs: Any) -> Artifact:
        return self.stages.run(task, label, store=self.store, **kwargs)

    def skip(self, stage: str, label: str, reason: str) -> Artifact:
        """A stage that cannot run here, recorded as skipped; its placeholder artifact has no key."""
        self.stages.skip(stage, label, reason)
        return Artifact(stage=stage, key="-", meta={"skipped": True, "reason": reason})


class Backend:
    """Subclass, set `name` (and `modes`, `libraries`, `options_schema` as needed), and override the
    hooks that differ from these defaults."""

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ("merged",)
    libraries: ClassVar[tuple[str, ...]] = ()  # their versions are part of every build's key
    options_schema: ClassVar[type[BaseModel] | None] = None  # None: the backend takes no `options`

    # ------------------------------------------------------------ pre-flight

    def validate(self, target: TargetConfig, architecture: str, model_config: dict, adapters: list[dict]) -> None:
        """Every config-time check, in order; pre-flight calls only this."""
        if target.mode not in self.modes:
            raise ConfigError(
                f"targets.{target.name}.mode: {self.name} supports {', '.join(self.modes)}, not {target.mode}"
            )
        self.options(target)
        self.check(target, architecture)
        self.check_model(target, model_config)
        self.check_adapters(target, adapters)

    def options(self, target: TargetConfig) -> Any:
        """The target's `options`, validated by `options_schema` (errors name the key path)."""
        if self.options_schema is None:
            if target.options:
                raise ConfigError(f"targets.{target.name}.options: backend {self.name} takes no options")
            return None
        return parse_options(target, self.options_schema)

    def check(self, target: TargetConfig, architecture: str) -> None:
        """Precision, device and architecture this backend accepts."""

    def check_model(self, target: TargetConfig, model_config: dict) -> None:
        """Limits of the base model's shape (head sizes, divisibility), from its config alone."""

    def check_adapters(self, target: TargetConfig, adapters: list[dict]) -> None:
        """Limits on the adapters (`name`, `modules`, `max_rank` each)."""

    # ------------------------------------------------------------ this machine

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        """None if the build can run on this machine, else why it is skipped."""
        return None

    def smoke_unavailable_reason(self, target: TargetConfig) -> str | None:
        """None if the built engine can be run here for the gate, else why it is only verified."""
        return None

    # ------------------------------------------------------------ deploy and run

    def deploy(self, ctx: DeployContext, target: TargetConfig, adapters: list[AdapterChain]) -> list[Deployment]:
        """Merged engines: one build per adapter from its merged model (cached by merged key and target)."""
        if target.mode != "merged":
            raise NotImplementedError(f"backend {self.name} declares mode {target.mode} but does not deploy it")
        deployments = []
        for a in adapters:
            engine = ctx.run(build_task, f"{a.name}/{target.name}", merged=a.merged, target=target)
            deployments.append(self.deployment(target, a.name, engine))
        return deployments

    def deployment(self, target: TargetConfig, adapter: str, engine: Artifact) -> Deployment:
        """The status of a built (or skipped) artifact: skipped, verified only, or ready for the gate."""
        if engine.meta.get("skipped"):
            return Deployment(target, adapter, engine, Status.SKIPPED, engine.meta.get("reason", ""))
        reason = self.smoke_unavailable_reason(target)
        if reason:
            return Deployment(target, adapter, engine, Status.VERIFIED_ONLY, reason)
        return Deployment(target, adapter, engine, Status.READY)

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        """Write a merged model's engine into `out`; return its metadata (sizes, times, commands)."""
        raise NotImplementedError(f"backend {self.name} builds no engine from a merged model")

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None) -> Engine:
        """A runtime for the smoke test; `adapter`: the one to activate in a multi-adapter bundle."""
        raise NotImplementedError(f"backend {self.name} has no runtime in ftd")

    def engine_bytes(self, target: TargetConfig, parameters: int) -> int | None:
        """About how much memory the built engine holds when the gate runs it (pre-flight refuses
        a target whose engine cannot fit this machine); None when unknown."""
        per_parameter = BYTES_PER_PARAMETER.get(target.precision)
        return None if per_parameter is None else int(parameters * per_parameter)

    def context_length(self, engine_dir: Path, target: TargetConfig) -> int | None:
        """The longest prompt + answer the built engine takes, where it is shorter than the model's
        (a served model refuses longer requests with a 400 instead of failing in the engine)."""
        return None


def parse_options(target: TargetConfig, schema: type[OptionsT]) -> OptionsT:
    """A target's backend-specific `options`, validated by the backend's schema; errors name the key path."""
    try:
        return schema.model_validate(target.options)
    except ValidationError as exc:
        raise ConfigError(f"targets.{target.name}.options: {describe_validation_error(exc)}") from None


def gpu_unavailable_reason(purpose: str, missing_packages: list[str]) -> str | None:
    """Why a CUDA step cannot run here, naming exactly what is missing: the GPU, the packages, or
    both. None when both are present: such a step must run, never be skipped (checked on a GPU
    machine by scripts/gpu_check.sh)."""
    import torch  # deferred for start-up time: only CUDA targets ask, and torch's import costs seconds

    packages = " and ".join(missing_packages)
    if not torch.cuda.is_available():
        if missing_packages:
            return f"{purpose} needs a GPU and {packages}; neither is present here (no NVIDIA GPU is visible)"
        return f"{purpose} needs a GPU; no NVIDIA GPU is visible (torch.cuda.is_available() is False)"
    if missing_packages:
        return f"{purpose} needs {packages}, not installed here (a GPU is present: {torch.cuda.get_device_name(0)})"
    return None
