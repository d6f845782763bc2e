"""Greedy decoding through llama.cpp itself (llama-cpp-python), with every step's logits.

One `LoadedGguf` is one model in memory with, for a multi-LoRA bundle, every adapter's LoRA GGUF
loaded on it (`llama_adapter_lora_init`); a call names the adapter to activate
(`llama_set_adapters_lora`, ~0.1 ms). Every call starts from an empty KV cache: llama-cpp-python's
own `generate()` would reuse a cached prompt prefix whatever adapter computed it (after a switch
its logits were off by 3). Calls are serialised: one context decodes one sequence at a time.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftd.errors import FtdError
from tasks.backends.runtime import Generation

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values (ggml.h: GGML_TYPE_F32, _F16, _Q8_0)
MANIFEST = "ftd-gguf.json"


def quiet_llama_log() -> None:
    """llama.cpp logs every load to stderr; ftd reports failures itself."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # pragma: no cover - called from C
        return None

    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    quiet_llama_log.callback = _drop  # keep the C callback alive


class LoadedGguf:
    def __init__(self, model: Path, adapters: dict[str, Path], n_ctx: int, n_threads: int, kv_type: str):
        import llama_cpp
        from llama_cpp import Llama

        quiet_llama_log()
        self.llama_cpp = llama_cpp
        threads = n_threads or os.cpu_count() or 1
        self.llm = Llama(model_path=str(model), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                         n_threads_batch=threads, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                         flash_attn=kv_type == "q8_0",  # a quantised V cache needs flash attention (llama-context.cpp)
                         logits_all=False, verbose=False)  # fmt: skip
        self.n_ctx, self.n_vocab = n_ctx, self.llm.n_vocab()
        self.adapters = {}
        for name, path in adapters.items():
            handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not handle:
                raise FtdError(f"llama.cpp could not load the LoRA GGUF {path} (adapter {name})")
            self.adapters[name] = handle
        self.active: str | None = None
        self._set(None)
        self.lock = threading.Lock()
        # closed before the interpreter tears modules down (llama-cpp-python's __del__ would fail then)
        atexit.register(_close_if_alive, weakref.ref(self))

    def _set(self, adapter: str | None) -> None:
        lc = self.llama_cpp
        if adapter is None:
            code = lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            code = lc.llama_set_adapters_lora(self.llm.ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise FtdError(f"llama.cpp refused to activate adapter {adapter!r} (code {code})")
        self.active = adapter

    def tokens(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int],
               adapter: str | None = None) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
        """Greedy decoding, one (token, logits) pair at a time, from an empty cache."""
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise FtdError(f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceed n_ctx {self.n_ctx}")
        if adapter is not None and adapter not in self.adapters:
            raise FtdError(f"this GGUF bundle has no adapter {adapter!r} (it has {', '.join(sorted(self.adapters))})")
        with self.lock:
            if adapter != self.active:
                self._set(adapter)
            llm = self.llm
            llm.reset()  # n_tokens = 0: eval() then drops every cached position first
            llm.eval(prompt_ids)
            for _ in range(max_new_tokens):
                pointer = self.llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float32, copy=True)
                token = int(np.argmax(logits))
                yield token, logits
                if token in eos_ids:
                    break
                llm.eval([token])

    def close(self) -> None:
        self.llm.close()


def _close_if_alive(ref: weakref.ref) -> None:
    model = ref()
    if model is not None:
        model.close()


@functools.lru_cache(maxsize=2)
def loaded(bundle_dir: Path) -> LoadedGguf:
    """One loaded bundle per folder (the last two kept): every adapter's view shares its weights."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    adapters = {name: bundle_dir / entry["file"] for name, entry in manifest.get("adapters", {}).items()
                if entry.get("file")}  # fmt: skip
    return LoadedGguf(bundle_dir / manifest["model"], adapters, manifest["n_ctx"], manifest["n_threads"],
                      manifest["kv_cache_type"])  # fmt: skip


@dataclass
class GgufEngine:
    """The smoke test's and the chat model's `Engine`: one bundle, one adapter active (or none)."""

    model: LoadedGguf
    adapter: str | None = None

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        tokens, logits = [], []
        for token, step in self.model.tokens(prompt_ids, max_new_tokens, eos_ids, self.adapter):
            tokens.append(token)
            logits.append(step)
        return Generation(tokens=tokens, logits=logits)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Iterator[int]:
        for token, _ in self.model.tokens(prompt_ids, max_new_tokens, eos_ids, self.adapter):
            yield token
