"""The llama.cpp stages up to the GGUF files, each cached on its own:

1. `convert_model`: an HF model folder (a merged model, or the base of a multi-LoRA bundle) to a
   GGUF in a type the converter writes directly (f32, f16, bf16, q8_0). The tokenizer goes in
   too; llama.cpp's tokenisation is then checked against the HF tokenizer's, because llama-server
   and Ollama tokenise the prompt themselves (the gate feeds token ids and would not notice).
2. `quantize_model`: that GGUF to Q4_0 / Q4_K_M / Q5_K_M with `llama_model_quantize`.
3. `convert_adapter`: one PEFT adapter to a LoRA GGUF over the base. llama.cpp scales a LoRA by
   alpha / rank and knows neither rsLoRA nor per-module alpha/rank patterns, so the trained
   scale of every module is folded into B first and alpha is written as 0 (llama.cpp then applies
   the user's scale, 1.0, alone); ΔW of every module is checked against the trained one.

The converters run in a child interpreter (`worker.py`), with llama.cpp's own gguf-py.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ftd.errors import FtdError
from ftd.orchestration import stage_task
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from tasks.backends.llama_cpp import tools
from tasks.backends.llama_cpp.options import QUANTIZED
from tasks.base_model import model_dir
from tasks.logged_command import BuildLog
from tasks.merge import module_scale, read_adapter
from tasks.sft import adapter_dir

GGUF, QUANT, LORA = "gguf", "gguf-quant", "gguf-lora"
WORKER = Path(__file__).with_name("worker.py")
LIBRARIES = ("llama-cpp-python", "torch", "transformers", "safetensors")
CODE = (__file__, str(WORKER))
MODEL_FILE, LORA_FILE = "model.gguf", "adapter.gguf"
# Strings whose tokenisation llama.cpp and the HF tokenizer must agree on (plus chat turns).
TOKENIZER_PROBES = (
    "Hello world", "  two  spaces", "digits 0123456789 and 3.14", "new\nline\ttab", "ÄÖü café naïve",
    "emoji 🦙🚀", "code: def f(x): return x**2", "'quotes' \"double\" it's", "",
)  # fmt: skip


def run_worker(command: str, spec: dict, log: Path, what: str) -> dict:
    """One worker command; its output appended to `log`; returns what it measured."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        BuildLog(log).run([sys.executable, str(WORKER), str(tools.tools_dir()), command, str(spec_path)], what)
        return json.loads(Path(spec["result"]).read_text())


def model_folder(model: Artifact, store: Store) -> Path:
    """A merged model's folder is its artifact; a base model's is where it was built or found."""
    return model_dir(model) if "model_dir" in model.meta else model.path(store)


def lossless_type(folder: Path) -> str:
    """The GGUF type that stores the model's weights exactly (the source of any quantisation)."""
    config = json.loads((folder / "config.json").read_text())
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


# ---------------------------------------------------------------- 1. HF folder → GGUF


def model_key(model: Artifact, outtype: str, pre_tokenizer: str) -> str:
    return stage_key(GGUF, code=code_version(*CODE), config={"outtype": outtype, "pre_tokenizer": pre_tokenizer},
                     inputs=[model.key], libraries=library_versions(*LIBRARIES))  # fmt: skip


def convert_model(model: Artifact, outtype: str, pre_tokenizer: str, store: Store) -> Artifact:
    folder = model_folder(model, store)

    def build(tmp: Path) -> dict:
        spec = {"model_dir": str(folder), "out": str(tmp / MODEL_FILE), "outtype": outtype,
                "pre_tokenizer": pre_tokenizer}  # fmt: skip
        result = run_worker("convert-hf", spec, tmp / "build.log", f"convert {folder.name} to GGUF {outtype}")
        tokenizer = check_tokenizer(folder, tmp / MODEL_FILE)
        return {"file": MODEL_FILE, "outtype": outtype, "bytes": (tmp / MODEL_FILE).stat().st_size,
                "tokenizer_check": tokenizer, **result}  # fmt: skip

    return store.materialize(GGUF, model_key(model, outtype, pre_tokenizer), build, lineage={"model": model.key})


def check_tokenizer(folder: Path, gguf: Path) -> dict:
    """llama.cpp's tokenisation of the probes and of rendered chat turns, as llama-server does it
    (BOS per the GGUF, special tokens parsed), against the HF tokenizer's ids."""
    from llama_cpp import Llama

    from tasks.modeling import load_tokenizer

    hf = load_tokenizer(folder)
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    texts = list(TOKENIZER_PROBES)
    expected = [hf.encode(t, add_special_tokens=True) for t in texts]
    if getattr(hf, "chat_template", None):
        for turns in ([{"role": "user", "content": "What is 12 + 30?"}],
                      [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name 3 colours"},
                       {"role": "assistant", "content": "red, green, blue"}, {"role": "user", "content": "More?"}]):  # fmt: skip
            texts.append(hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
            expected.append(list(hf.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)))
    differing = []
    for text, ids in zip(texts, expected):
        got = vocab.tokenize(text.encode(), add_bos=vocab.metadata.get("tokenizer.ggml.add_bos_token") != "false",
                             special=True)  # fmt: skip
        if got != ids:
            differing.append({"text": text, "hf": ids, "llama_cpp": got})
    vocab.close()
    if differing:
        first = differing[0]
        raise FtdError(
            f"llama.cpp tokenises {len(differing)} of {len(texts)} probe texts differently from the HF tokenizer of "
            f"{folder} (first: {first['text']!r}: HF {first['hf'][:12]} vs llama.cpp {first['llama_cpp'][:12]}); "
            "llama-server and Ollama would answer a different prompt. If the converter fell back to a "
            "pre-tokenizer, set targets[].options.pre_tokenizer to the llama.cpp one matching this tokenizer"
        )
    return {"texts": len(texts), "identical": len(texts)}


# ---------------------------------------------------------------- 2. GGUF → quantised GGUF


def quantize_key(source: Artifact, precision: str) -> str:
    return stage_key(QUANT, code=code_version(*CODE), config={"precision": precision}, inputs=[source.key],
                     libraries=library_versions("llama-cpp-python"))  # fmt: skip


def quantize_model(source: Artifact, precision: str, store: Store) -> Artifact:
    def build(tmp: Path) -> dict:
        spec = {"source": str(source.path(store) / MODEL_FILE), "out": str(tmp / MODEL_FILE),
                "ftype": QUANTIZED[precision]}  # fmt: skip
        result = run_worker("quantize", spec, tmp / "build.log", f"quantise GGUF to {precision}")
        return {"file": MODEL_FILE, "precision": precision, "bytes": (tmp / MODEL_FILE).stat().st_size,
                "source": source.key, **result}  # fmt: skip

    return store.materialize(QUANT, quantize_key(source, precision), build, lineage={"source": source.key})


# ---------------------------------------------------------------- 3. PEFT adapter → LoRA GGUF


def adapter_key(base: Artifact, adapter: Artifact, lora_type: str) -> str:
    return stage_key(LORA, code=code_version(*CODE), config={"outtype": lora_type}, inputs=[base.key, adapter.key],
                     libraries=library_versions(*LIBRARIES))  # fmt: skip


def fold_adapter(name: str, peft_dir: Path, out: Path) -> dict:
    """A copy of the adapter whose B holds each module's trained scale, with lora_alpha 0 (llama.cpp
    then scales by the user's scale alone): rsLoRA and alpha/rank patterns are served exactly."""
    from safetensors.torch import save_file

    try:
        config, pairs = read_adapter(peft_dir)
    except FtdError as exc:
        raise FtdError(f"adapter {name} cannot be served by llama.cpp: {exc}") from None
    tensors, worst = {}, 0.0
    for pair in pairs.values():
        scale = module_scale(config, pair.module, pair.A.shape[0])
        folded = (pair.B.float() * scale).to(pair.B.dtype)
        prefix = f"base_model.model.{pair.module}"
        tensors[f"{prefix}.lora_A.weight"] = pair.A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = folded.contiguous()
        trained = scale * (pair.B.float() @ pair.A.float())
        served = folded.float() @ pair.A.float()
        worst = max(worst, float((served - trained).abs().max()) / (float(trained.abs().max()) or 1.0))
    if worst > 1e-5:
        raise FtdError(f"adapter {name}: the folded ΔW differs from the trained one by {worst:.1e} (relative)")
    out.mkdir(parents=True, exist_ok=True)
    folded_config = {k: v for k, v in config.items() if k not in ("alpha_pattern", "rank_pattern")}
    folded_config.update(lora_alpha=0, use_rslora=False)
    (out / "adapter_config.json").write_text(json.dumps(folded_config, indent=2))
    save_file(tensors, out / "adapter_model.safetensors")
    return {"modules": len(pairs), "ranks": sorted({p.A.shape[0] for p in pairs.values()}),
            "was_rslora": bool(config.get("use_rslora")), "max_delta_rel_error": worst}  # fmt: skip


def convert_adapter(base: Artifact, adapter: Artifact, lora_type: str, store: Store) -> Artifact:
    name = adapter.meta["adapter_name"]

    def build(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory() as scratch:
            folded = fold_adapter(name, adapter_dir(adapter, store), Path(scratch) / "folded")
            spec = {"base_dir": str(model_folder(base, store)), "adapter_dir": str(Path(scratch) / "folded"),
                    "out": str(tmp / LORA_FILE), "outtype": lora_type}  # fmt: skip
            result = run_worker("convert-lora", spec, tmp / "build.log", f"convert adapter {name} to a LoRA GGUF")
        alpha = result["metadata"].get("adapter.lora.alpha")
        if alpha not in (0, 0.0):
            raise FtdError(f"adapter {name}: the LoRA GGUF has alpha {alpha}, expected 0 (scale folded into B)")
        return {"adapter_name": name, "file": LORA_FILE, "outtype": lora_type,
                "bytes": (tmp / LORA_FILE).stat().st_size, "folding": folded, **result}  # fmt: skip

    return store.materialize(LORA, adapter_key(base, adapter, lora_type), build,
                             lineage={"base": base.key, "adapter": adapter.key})  # fmt: skip


model_task = stage_task(convert_model, GGUF, model_key, "gguf[{outtype}]")
quantize_task = stage_task(quantize_model, QUANT, quantize_key, "gguf-quant[{precision}]")
adapter_task = stage_task(convert_adapter, LORA, adapter_key, "gguf-lora[{adapter.meta[adapter_name]}]")
