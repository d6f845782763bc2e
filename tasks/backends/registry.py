"""Backend name → the module whose `BACKEND` implements it. Adding a backend is one line here.

Modules are imported on first use, by name: a run imports only the backends its targets name
(pre-flight's `validate` imports those too), and no backend module imports another."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ftd.errors import ConfigError

if TYPE_CHECKING:
    from tasks.backends.base import Backend

BUILTIN: dict[str, str] = {
    "onnx_genai": "tasks.backends.onnx_genai.backend",
    "tensorrt_llm": "tasks.backends.tensorrt_llm.backend",
    "dashinfer": "tasks.backends.dashinfer.backend",
    "accessory": "tasks.backends.accessory.backend",
    "mindspore": "tasks.backends.mindspore.backend",
    "llama_cpp": "tasks.backends.llama_cpp.backend",
}
_LOADED: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """A backend defined outside `BUILTIN` (a plug-in, or a test's fake): known by its name."""
    _LOADED[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _LOADED.pop(name, None)


def known() -> list[str]:
    return sorted(set(BUILTIN) | set(_LOADED))


def get_backend(name: str) -> Backend:
    if name not in _LOADED:
        if name not in BUILTIN:
            raise ConfigError(f"targets: unknown backend {name!r}; known: {', '.join(known())}")
        backend = importlib.import_module(BUILTIN[name]).BACKEND
        if backend.name != name:
            raise RuntimeError(f"{BUILTIN[name]}.BACKEND is named {backend.name!r}, registered as {name!r}")
        _LOADED[name] = backend
    return _LOADED[name]
