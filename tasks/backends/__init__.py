"""The backend interface and registry: one module per serving backend, one small contract.

A backend says what it consumes (a merged model directory), which precisions/devices it can
build and on which architectures (checked at config time), whether it can build *here* (a GPU-
only backend returns the reason it must be skipped), how to build, and how to run an engine for
the smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from ftd.config import TargetConfig, describe_validation_error
from ftd.errors import ConfigError


@dataclass
class Generation:
    tokens: list[int]
    logits: list[np.ndarray] | None  # one vector per generated step, when the engine exposes them


class Engine(Protocol):
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation: ...


class Backend(Protocol):
    name: str
    libraries: tuple[str, ...]

    def check(self, target: TargetConfig, architecture: str) -> None:
        """Raise ConfigError if this target cannot be built for this architecture."""

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        """None if the build can run on this machine, else why it must be skipped."""

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        """Write the engine into `out`; return metadata (sizes, times, command)."""

    def open(self, engine_dir: Path, target: TargetConfig) -> Engine: ...


OptionsT = TypeVar("OptionsT", bound=BaseModel)


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
    import torch  # deferred: only CUDA targets ask, and torch's import costs seconds

    packages = " and ".join(missing_packages)
    if not torch.cuda.is_available():
        if missing_packages:
            return f"{purpose} needs a GPU and {packages}; neither is present here"
        return f"{purpose} needs a GPU; none is visible (torch.cuda.is_available() is False)"
    if missing_packages:
        return f"{purpose} needs {packages}, not installed here (a GPU is present: {torch.cuda.get_device_name(0)})"
    return None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise ConfigError(f"targets: unknown backend {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin_backends() -> None:
    from tasks.backends import accessory, dashinfer, mindspore, onnx_genai, tensorrt_llm  # noqa: F401  (self-registering)
