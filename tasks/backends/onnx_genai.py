"""ONNX Runtime GenAI: build with the onnxruntime-genai model builder, run with `og.Generator`.

The builder runs as a subprocess (`python -m onnxruntime_genai.models.builder`): it is the
documented entry point, it keeps the builder's large transient memory out of the flow process,
and its exact command is recorded in the engine's metadata so a user can rerun it by hand.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from tasks.backends import Generation, register

# (precision, device) pairs the builder accepts; the CPU ones can be built on this machine.
SUPPORTED = {
    ("fp32", "cpu"),
    ("int4", "cpu"),
    ("int8", "cpu"),
    ("fp32", "cuda"),
    ("fp16", "cuda"),
    ("bf16", "cuda"),
    ("int4", "cuda"),
}
ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
}  # fmt: skip


class OnnxGenAI:
    name = "onnx_genai"
    libraries = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers")

    def check(self, target: TargetConfig, architecture: str) -> None:
        if (target.precision, target.device) not in SUPPORTED:
            pairs = ", ".join(f"{p}/{d}" for p, d in sorted(SUPPORTED))
            raise ConfigError(
                f"targets.{target.name}: precision {target.precision!r} on device {target.device!r} "
                f"is not supported by onnx_genai (supported: {pairs})"
            )
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"targets.{target.name}: onnx_genai cannot build {architecture}")
        unknown = set(target.options) - {"extra_options"}
        if unknown:
            raise ConfigError(f"targets.{target.name}.options: unknown key(s) {sorted(unknown)} (known: extra_options)")

    def unavailable_reason(self, target: TargetConfig) -> str | None:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "the onnxruntime-genai package is not installed"
        if target.device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "device cuda needs a GPU and the onnxruntime-genai-cuda package; neither is present here"
        return None

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        extra = [f"{k}={v}" for k, v in (target.options.get("extra_options") or {}).items()]
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(merged_dir), "-o", str(out), "-p", target.precision, "-e", target.device,
            "-c", str(out / ".builder-cache"),
        ] + (["--extra_options", *extra] if extra else [])  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (out / "build.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise FtdError(f"onnx_genai build of target {target.name} failed: " + " | ".join(tail))
        _remove_tree(out / ".builder-cache")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        shown = ["python" if c == sys.executable else c for c in command]
        shown = [
            "<merged model dir>" if c == str(merged_dir) else "<engine dir>" if c == str(out) else c for c in shown
        ]
        return {"build_seconds": round(seconds, 3), "engine_bytes": size, "command": " ".join(shown)}

    def open(self, engine_dir: Path, target: TargetConfig) -> OgEngine:
        return OgEngine(engine_dir)


class OgEngine:
    def __init__(self, engine_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(engine_dir))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        for _ in range(max_new_tokens):
            # get_logits() before generate_next_token(): afterwards it would already return
            # (and compute) the next position's logits.
            logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1).copy())
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            tokens.append(token)
            if token in eos_ids:
                break
        return Generation(tokens=tokens, logits=logits)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


register(OnnxGenAI())
