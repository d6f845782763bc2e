"""The llama.cpp backend's config-time checks, Ollama template, bundle files and availability
(no llama.cpp needed). Conversion, the scale folding and the adapter switch through llama.cpp
itself are in test_llama_cpp_runtime.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ftd.builtin_models import BUILTINS, CHAT_TEMPLATE, train_tokenizer
from ftd.config import TargetConfig
from ftd.errors import ConfigError
from tasks.backends.llama_cpp import bundle, template, tools
from tasks.backends.llama_cpp.backend import BACKEND
from tasks.backends.llama_cpp.options import kv_cache_type, precision_of
from tasks.backends.registry import get_backend

LLAMA = "LlamaForCausalLM"
MODULES = ["q_proj", "v_proj"]


def target(**fields) -> TargetConfig:
    return TargetConfig(**{"name": "gguf", "backend": "llama_cpp", **fields})


def adapter(**fields) -> dict:
    return {"name": "a", "modules": MODULES, "max_rank": 8, **fields}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(BUILTINS["tiny-llama"])


def test_registered_under_its_name() -> None:
    assert get_backend("llama_cpp") is BACKEND


@pytest.mark.parametrize("precision", ["f32", "fp32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"])
def test_every_precision_is_accepted(precision: str) -> None:
    BACKEND.validate(target(precision=precision), LLAMA, {}, [adapter()])
    BACKEND.validate(target(precision=precision, mode="multi_lora"), LLAMA, {}, [adapter()])


@pytest.mark.parametrize(
    ("fields", "arch", "adapters", "message"),
    [
        ({"precision": "int4"}, LLAMA, [], "targets.gguf.precision: llama_cpp builds f32, f16"),
        ({"device": "cuda"}, LLAMA, [], "targets.gguf.device: ftd builds llama.cpp for the CPU"),
        ({}, "GPT2LMHeadModel", [], "ftd converts LlamaForCausalLM"),
        ({"options": {"kv_cache": "f32"}}, LLAMA, [], "targets.gguf.options"),
        ({"options": {"kv_cache_type": "q4_0"}}, LLAMA, [], "kv_cache_type"),
        ({}, LLAMA, [adapter(use_dora=True)], "adapters.a: a DoRA adapter (use_dora)"),
        ({}, LLAMA, [adapter(modules_to_save=["lm_head"])], "adapters.a: modules_to_save ['lm_head']"),
        ({}, LLAMA, [adapter(modules=["embed_tokens", "q_proj"])], "adapters.a: LoRA on the embedding (embed_tokens)"),
    ],
)
def test_refusals_name_the_field(fields: dict, arch: str, adapters: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        BACKEND.validate(target(**fields), arch, {}, adapters)


def test_dora_and_modules_to_save_of_an_imported_adapter_are_refused_before_training(tmp_path: Path) -> None:
    """Pre-flight reads them from the imported adapter's own config."""
    import torch
    from safetensors.torch import save_file

    from flows.preflight import preflight
    from ftd.config import validate_config

    for field, value, message in (("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save")):
        folder = tmp_path / field
        folder.mkdir()
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value})
        )
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"  # tensors of the right shapes: a real adapter
        save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 4)},
                  folder / "adapter_model.safetensors")  # fmt: skip
        cfg = validate_config({
            "experiment": "x", "base_model": "builtin:tiny-llama", "artifacts_dir": str(tmp_path / "artifacts"),
            "adapters": [{"name": "imp", "import_from": str(folder),
                          "data": {"train": "data/numbers/train.jsonl", "eval": "data/numbers/eval.jsonl"}}],
            "targets": [{"name": "gguf", "backend": "llama_cpp"}],
        })  # fmt: skip
        with pytest.raises(ConfigError, match=f"adapters.imp: .*{message}"):
            preflight(cfg)


def test_precision_aliases_and_kv_cache_defaults() -> None:
    assert precision_of(target(precision="fp32")) == "f32"
    assert kv_cache_type(target(precision="f32")) == "f32"  # the gate's 1e-4 needs an f32 cache
    assert kv_cache_type(target(precision="q4_0")) == "f16"  # what llama-server and Ollama use
    assert kv_cache_type(target(precision="q4_0", options={"kv_cache_type": "f32"})) == "f32"


# ---------------------------------------------------------------- the Ollama template


def test_the_builtin_chat_template_becomes_an_equal_ollama_template(tokenizer) -> None:
    derived = template.derive(tokenizer)
    assert derived.problem is None
    assert derived.template == (
        '{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}<|system|>\n{{ .Content }}\n'
        '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}</s>{{ end }}'  # trim_blocks: no newline
        '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|assistant|>\n{{ end }}{{ end }}'
    )
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]  # fmt: skip
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert template.render(derived.pieces, conversation) == expected


def test_a_template_of_another_shape_is_reported_not_written_wrong(tokenizer) -> None:
    """A default system prompt when none is given is not a fixed per-role wrapping."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are helpful.\n{% endif %}" + CHAT_TEMPLATE
    )
    derived = template.derive(tokenizer)
    assert derived.template is None and "not a fixed prefix/suffix per role" in derived.problem
    tokenizer.chat_template = None
    assert template.derive(tokenizer).problem == "the tokenizer has no chat template"


def test_braces_in_the_chat_text_are_quoted_for_go() -> None:
    pieces = template.Pieces("", {"user": ("{{u}}:", "\n")}, "A:")
    assert template.go_template(pieces).startswith('{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}'
                                                   '{{ "{" }}{{ "{" }}u{{ "}" }}{{ "}" }}:')  # fmt: skip


# ---------------------------------------------------------------- bundle files


def manifest(multi: bool) -> dict:
    adapters = {"numbers": {"lora_id": 0 if multi else None, "file": "adapters/numbers.gguf" if multi else None,
                            "eos": [2], "stop": ["</s>"], "modelfile": "Modelfile.numbers" if multi else "Modelfile",
                            "ollama_template": {"written": True, "problem": None}}}  # fmt: skip
    if multi:
        adapters["digits"] = {**adapters["numbers"], "lora_id": 1, "file": "adapters/digits.gguf",
                              "modelfile": "Modelfile.digits"}  # fmt: skip
    return {"model": "model.gguf", "mode": "multi_lora" if multi else "merged", "precision": "f32",
            "kv_cache_type": "f32", "n_ctx": 256, "n_threads": 0, "llama_cpp_python": tools.VERSION,
            "adapters": adapters}  # fmt: skip


def test_server_command_loads_every_adapter_unapplied_with_the_gates_cache() -> None:
    command = bundle.server_command(manifest(multi=True))
    assert command[:3] == ["llama-server", "-m", "./model.gguf"]
    assert command[command.index("-ctk") + 1] == "f32" and command[command.index("-c") + 1] == "256"
    loras = [command[i + 1] for i, part in enumerate(command) if part == "--lora"]
    assert loras == ["./adapters/numbers.gguf", "./adapters/digits.gguf"]  # in lora_id order
    assert "--lora-init-without-apply" in command
    assert "--lora" not in bundle.server_command(manifest(multi=False))
    script = bundle.server_script(manifest(multi=True))
    assert '"$HERE/model.gguf"' in script and script.startswith("#!/usr/bin/env sh")


def test_sample_requests_pick_one_adapter() -> None:
    m = manifest(multi=True)
    request = bundle.sample_request(m["adapters"]["digits"], 2)
    assert request["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    assert "lora" not in bundle.sample_request(manifest(multi=False)["adapters"]["numbers"], 1)


def test_modelfile_has_adapter_template_stops_and_greedy_decoding(tokenizer) -> None:
    entry = manifest(multi=True)["adapters"]["digits"]
    text = bundle.modelfile(entry, template.derive(tokenizer), 256)
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines and "ADAPTER ./adapters/digits.gguf" in lines
    assert 'PARAMETER stop "</s>"' in lines and "PARAMETER temperature 0" in lines and "PARAMETER num_ctx 256" in lines
    assert 'TEMPLATE """{{ range $i' in text
    missing = bundle.modelfile(entry, template.Derived(None, "the tokenizer has no chat template"), 256)
    assert "TEMPLATE" not in missing.replace("# TEMPLATE not written", "")
    assert "# TEMPLATE not written: the tokenizer has no chat template" in missing


def test_context_length_defaults_to_the_models_capped() -> None:
    assert bundle.context_length({"max_position_embeddings": 256}, target()) == 256
    assert bundle.context_length({"max_position_embeddings": 131072}, target()) == bundle.DEFAULT_MAX_CTX
    assert bundle.context_length({"max_position_embeddings": 256}, target(options={"n_ctx": 128})) == 128


# ---------------------------------------------------------------- availability


def test_missing_pieces_are_reported_with_the_way_to_fix_them(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tools, "SHARE", tmp_path)
    monkeypatch.setattr(tools, "runtime_version", lambda: None)
    assert "llama-cpp-python package is not installed" in tools.unavailable_reason()
    monkeypatch.setattr(tools, "runtime_version", lambda: "0.3.1")
    assert "llama-cpp-python 0.3.1 is installed" in tools.unavailable_reason()
    monkeypatch.setattr(tools, "runtime_version", lambda: tools.VERSION)
    monkeypatch.setenv("FTD_LLAMA_CPP_TOOLS", str(tmp_path / "nowhere"))
    assert "converters (convert_hf_to_gguf.py" in tools.unavailable_reason()
    (tmp_path / "UNAVAILABLE").write_text("no C++ compiler (c++/g++) is installed (install log: x)")
    assert tools.unavailable_reason().startswith("llama.cpp could not be installed by make install: no C++ compiler")
    assert BACKEND.unavailable_reason(target()) == tools.unavailable_reason()


def test_install_without_cmake_records_the_reason_and_succeeds(tmp_path: Path) -> None:
    """make install's llama.cpp step on a machine without cmake: exit 0, the reason written where
    the backend reads it."""
    import os
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"  # a PATH with the few tools the script needs, and no cmake
    bin_dir.mkdir()
    for tool in ("mkdir", "rm"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    venv = tmp_path / "venv"
    script = Path(__file__).resolve().parent.parent / "scripts" / "install_llama_cpp.sh"
    proc = subprocess.run([shutil.which("bash"), str(script), str(venv)], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "llama.cpp backend unavailable: cmake is not installed" in proc.stderr
    recorded = venv / "share" / "ftd-llama.cpp" / "UNAVAILABLE"
    assert recorded.read_text().startswith("cmake is not installed; llama-cpp-python is built from source")


def test_a_served_bundle_limits_requests_to_its_engines_context(tmp_path: Path) -> None:
    """The GGUF bundle's n_ctx (at most 4096 by default) is shorter than a 128k model's context: the
    chat model is told, so a too-long request is a 400, not an engine failure."""
    (tmp_path / "ftd-gguf.json").write_text(json.dumps(manifest(multi=False)))
    assert BACKEND.context_length(tmp_path, target()) == 256
    from tasks.backends.base import Backend

    assert Backend().context_length(tmp_path, target()) is None  # other engines: the model's context
