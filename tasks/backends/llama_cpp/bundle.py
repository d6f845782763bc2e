"""The deployable llama.cpp bundle: the GGUF files and how to serve them, for each adapter.

    model.gguf                 the merged model (mode merged) or the base (mode multi_lora)
    adapters/NAME.gguf         multi_lora: one LoRA GGUF per adapter, its scale folded in
    Modelfile[.NAME]           Ollama: FROM, ADAPTER, TEMPLATE (derived from the chat template and
                               checked, tasks/backends/llama_cpp/template.py), stop tokens, greedy
    llama-server.sh            llama-server with every adapter loaded (`--lora`, scale 0 until a
                               request picks one), the gate's context length and KV-cache type
    request.NAME.json          a chat request for llama-server choosing that adapter
    ftd-gguf.json              the manifest the runtime and the gate read
    README.md

Nothing is copied: the GGUF files are hard links to the conversion stages' outputs.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ftd.config import TargetConfig
from ftd.orchestration import stage_task
from ftd.store import Artifact, Store, code_version, library_versions, link_or_copy, stage_key
from tasks.backends.llama_cpp import template, tools
from tasks.backends.llama_cpp.convert import LORA_FILE, MODEL_FILE
from tasks.backends.llama_cpp.options import kv_cache_type, options_of, precision_of
from tasks.backends.llama_cpp.runtime import MANIFEST
from tasks.base_model import model_dir
from tasks.sft import adapter_dir

BUNDLE = "gguf-bundle"
DEFAULT_MAX_CTX = 4096  # a 128k-context model's full KV cache would not fit a laptop; set options.n_ctx
PORT = 8080


def bundle_key(model: Artifact, loras: list[Artifact], adapters: list[Artifact], base: Artifact,
               target: TargetConfig, n_ctx: int) -> str:  # fmt: skip
    return stage_key(
        BUNDLE,
        code=code_version(__file__, template.__file__),
        config={"target": target.model_dump(mode="json", exclude={"name", "thresholds"}), "n_ctx": n_ctx},
        inputs=[model.key, *[a.key for a in loras], *[a.key for a in adapters], base.key],
        libraries=library_versions("llama-cpp-python", "transformers"),
    )


def context_length(model_config: dict, target: TargetConfig) -> int:
    """options.n_ctx, else the model's max positions up to DEFAULT_MAX_CTX."""
    chosen = options_of(target).n_ctx
    if chosen:
        return chosen
    return min(int(model_config.get("max_position_embeddings") or DEFAULT_MAX_CTX), DEFAULT_MAX_CTX)


def assemble_bundle(model: Artifact, loras: list[Artifact], adapters: list[Artifact], base: Artifact,
                    target: TargetConfig, n_ctx: int, store: Store) -> Artifact:  # fmt: skip
    """`loras` empty: a merged engine for the single adapter in `adapters` (its weights are in
    `model`); else one LoRA GGUF per adapter, in the same order."""
    from tasks.modeling import eos_token_ids, load_tokenizer

    def build(tmp: Path) -> dict:
        link_or_copy(model.path(store) / MODEL_FILE, tmp / MODEL_FILE)
        options = options_of(target)
        manifest = {"model": MODEL_FILE, "mode": target.mode, "precision": precision_of(target),
                    "kv_cache_type": kv_cache_type(target), "n_ctx": n_ctx, "n_threads": options.n_threads,
                    "llama_cpp_python": tools.VERSION, "model_gguf": model.key, "adapters": {}}  # fmt: skip
        for i, adapter in enumerate(adapters):
            name = adapter.meta["adapter_name"]
            folder = adapter_dir(adapter, store)
            tokenizer = load_tokenizer(folder)
            eos = eos_token_ids(tokenizer, model_dir(base))  # the stop tokens the gate decoded with
            entry = {"lora_id": i if loras else None, "file": None, "eos": eos,
                     "stop": [tokenizer.convert_ids_to_tokens(t) for t in eos]}  # fmt: skip
            if loras:
                entry["file"] = f"adapters/{name}.gguf"
                entry["key"] = loras[i].key
                link_or_copy(loras[i].path(store) / LORA_FILE, tmp / entry["file"])
            derived = template.derive(tokenizer)
            entry["ollama_template"] = {"written": derived.template is not None, "problem": derived.problem}
            entry["modelfile"] = "Modelfile" if not loras else f"Modelfile.{name}"
            (tmp / entry["modelfile"]).write_text(modelfile(entry, derived, n_ctx))
            (tmp / f"request.{name}.json").write_text(json.dumps(sample_request(entry, len(adapters)), indent=2))
            manifest["adapters"][name] = entry
        (tmp / "llama-server.sh").write_text(server_script(manifest))
        (tmp / "llama-server.sh").chmod(0o755)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / "README.md").write_text(readme(manifest, target))
        return {"target": target.name, "backend": target.backend, "precision": manifest["precision"],
                "adapters": sorted(manifest["adapters"]), "bytes": (tmp / MODEL_FILE).stat().st_size,
                "n_ctx": n_ctx, "kv_cache_type": manifest["kv_cache_type"]}  # fmt: skip

    key = bundle_key(model, loras, adapters, base, target, n_ctx)
    return store.materialize(BUNDLE, key, build, lineage={"model": model.key, "loras": [a.key for a in loras]})


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Modelfile string: double quotes, backslash escapes


def modelfile(entry: dict, derived: template.Derived, n_ctx: int) -> str:
    lines = ["# Ollama Modelfile written by ftd: `ollama create NAME -f THIS_FILE` in this folder.",
             "# Decoding is greedy, as the parity gate checked it.", "FROM ./model.gguf"]  # fmt: skip
    if entry["file"]:
        lines.append(f"ADAPTER ./{entry['file']}")
    if derived.template is not None and '"""' not in derived.template:
        lines.append(f'TEMPLATE """{derived.template}"""')
    else:
        lines.append(f"# TEMPLATE not written: {derived.problem or 'it contains triple quotes'}; Ollama then uses "
                     "the chat template stored in the GGUF")  # fmt: skip
    lines += [f"PARAMETER stop {_quote(s)}" for s in entry["stop"]]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", f"PARAMETER num_ctx {n_ctx}"]
    return "\n".join(lines) + "\n"


def server_command(manifest: dict, folder: str = ".") -> list[str]:
    kv = manifest["kv_cache_type"]
    command = ["llama-server", "-m", f"{folder}/{manifest['model']}", "-c", str(manifest["n_ctx"]),
               "-ctk", kv, "-ctv", kv, "--jinja", "--host", "127.0.0.1", "--port", str(PORT)]  # fmt: skip
    files = [e["file"] for e in sorted(manifest["adapters"].values(), key=lambda e: e["lora_id"] or 0) if e["file"]]
    for file in files:
        command += ["--lora", f"{folder}/{file}"]
    if files:
        command.append("--lora-init-without-apply")  # every adapter at scale 0 until a request picks one
    if manifest["n_threads"]:
        command += ["-t", str(manifest["n_threads"])]
    return command


def server_script(manifest: dict) -> str:
    command = " ".join(f'"{p}"' if p.startswith("$HERE") else shlex.quote(p) for p in server_command(manifest, "$HERE"))
    return ("#!/usr/bin/env sh\n# llama-server (llama.cpp) serving this bundle on 127.0.0.1:8080, OpenAI-compatible\n"
            "# (/v1/chat/completions). Requests choose an adapter with \"lora\": see request.*.json.\n"
            'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
            f'exec {command} "$@"\n')  # fmt: skip


def sample_request(entry: dict, n_adapters: int) -> dict:
    request = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0, "max_tokens": 64}
    if entry["lora_id"] is not None:
        request["lora"] = [{"id": i, "scale": 1.0 if i == entry["lora_id"] else 0.0} for i in range(n_adapters)]
    return request


def readme(manifest: dict, target: TargetConfig) -> str:
    rows = "\n".join(
        f"| {name} | {e['file'] or '(merged into model.gguf)'} | {e['lora_id'] if e['lora_id'] is not None else '-'} "
        f"| {e['modelfile']} | {'yes' if e['ollama_template']['written'] else 'no: ' + str(e['ollama_template']['problem'])} |"
        for name, e in sorted(manifest["adapters"].items())
    )
    return f"""# llama.cpp bundle: target {target.name} ({manifest["precision"]}, {manifest["mode"]})

Built by ftd with llama-cpp-python {manifest["llama_cpp_python"]}; the parity gate ran these files through
llama.cpp with a {manifest["kv_cache_type"]} KV cache and a context of {manifest["n_ctx"]} tokens.

| adapter | GGUF | llama-server lora id | Ollama Modelfile | template derived |
|---|---|---|---|---|
{rows}

## llama-server

    ./llama-server.sh            # {" ".join(server_command(manifest))}
    curl -s 127.0.0.1:{PORT}/v1/chat/completions -H 'Content-Type: application/json' -d @request.NAME.json

A request's `"lora": [{{"id": N, "scale": 1.0}}]` activates adapter N for that request; the others stay at 0.

## Ollama

    ollama create my-model -f Modelfile{".NAME" if any(e["file"] for e in manifest["adapters"].values()) else ""}
    ollama run my-model

Ollama keeps its KV cache in f16 (`OLLAMA_KV_CACHE_TYPE`), so its logits can differ from the gate's by
about 1e-3 when the gate used f32. ftd does not run Ollama itself.
"""


bundle_task = stage_task(assemble_bundle, BUNDLE, bundle_key, "gguf-bundle[{target.name}]")
