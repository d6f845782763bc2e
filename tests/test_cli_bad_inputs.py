"""Bad inputs: each gives a one-line error naming the field or file, exits non-zero, registers
nothing, and is caught before any compute (no artifact, no MLflow database is created).

Most cases call the CLI's entry point in this process (the same `main` the `ftd` command runs);
`SUBPROCESS` cases run the real command, for the exit-code and stderr contract of the process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, CliResult, run_ftd

SUBPROCESS = {"missing dataset file", "misspelt key", "unreachable tracking server", "unknown backend"}

CASES = {
    "missing dataset file": (["--set", "adapters.0.data.train=data/numbers/nope.jsonl"], r"adapters\.numbers\.data\.train: file not found: data/numbers/nope\.jsonl"),
    "data.format naming a file type": (["--set", "adapters.0.data.format=parquet"], r"`adapters\.0\.data\.format`: Value error, 'parquet' is a file type: use `builder: parquet` instead \(`format` now names the instruction layout"),
    "data in another format than configured": (["--set", "adapters.0.data.format=alpaca"], r"train\.jsonl: row 1 has no column 'instruction' \(columns: messages\)"),
    "missing column": (["--set", "adapters.0.data.messages_field=conversation"], r"train\.jsonl: row 1 has no column 'conversation' \(columns: messages\)"),
    "unknown target module": (["--set", "adapters.0.lora.target_modules=[q_proj, qkv_proj]"], r"adapters\.numbers\.lora\.target_modules: \['qkv_proj'\] not in LlamaForCausalLM"),
    "r <= 0": (["--set", "adapters.0.lora.r=0"], r"`adapters\.0\.lora\.r`: Input should be greater than 0 \(got 0\)"),
    "base path does not exist": (["--set", "base_model=./models/missing-llama"], r"base_model: './models/missing-llama' does not exist"),
    "misspelt key": (["--set", "adapters.0.sft.learning_rat=0.1"], r"unknown key `adapters\.0\.sft\.learning_rat` \(did you mean `learning_rate`\?\)"),
    "unknown builtin": (["--set", "base_model=builtin:tiny-gpt9"], r"base_model: unknown builtin 'builtin:tiny-gpt9'; known: builtin:tiny-llama"),
    "unknown backend": (["--set", "targets.0.backend=vllm"], r"targets: unknown backend 'vllm'; known: accessory, dashinfer, llama_cpp, mindspore, onnx_genai, tensorrt_llm"),
    "unsupported precision": (["--set", "targets.0.precision=fp8"], r"targets\.onnx-fp32: precision 'fp8' on device 'cpu' is not supported by onnx_genai"),
    "bad override syntax": (["--set", "adapters.0.lora.r"], r"override 'adapters\.0\.lora\.r': expected KEY\.PATH=VALUE"),
    "unreachable tracking server": (["--set", "tracking.uri=http://127.0.0.1:9"], r"tracking\.uri: MLflow server http://127\.0\.0\.1:9 is not reachable"),
    "experiment name escaping the artifacts dir": (["--set", "experiment=../../etc"], r"`experiment`: String should match pattern"),
    "adapter name with a path separator": (["--set", "adapters.0.name=a/b"], r"`adapters\.0\.name`: String should match pattern"),
    "target name '..'": (["--set", "targets.0.name=.."], r"`targets\.0\.name`: String should match pattern"),
    "duplicate adapter names": (["--set", "adapters.1={name: numbers, data: {train: data/numbers/train.jsonl}}"], r"adapters: names must be unique, repeated: numbers"),
    "mode the backend lacks": (["--set", "targets.0={name: acc, backend: accessory, mode: multi_lora}"], r"targets\.acc\.mode: accessory supports merged, not multi_lora"),
    "Accessory model-parallel size not dividing the heads": (["--set", "targets.0={name: acc, backend: accessory, options: {model_parallel_size: 3}}"], r"targets\.acc\.options\.model_parallel_size: 3 does not divide the base model's num_attention_heads=4"),
    "TensorRT-LLM max_lora_rank below an adapter's rank": (["--set", "targets.0={name: trt, backend: tensorrt_llm, mode: multi_lora, precision: bf16, device: cuda, options: {max_lora_rank: 4}}"], r"targets\.trt\.options\.max_lora_rank: 4 is below adapter numbers's rank 8"),
    "TensorRT-LLM bf16 with .npy prefetch": (["--set", "targets.0={name: trt, backend: tensorrt_llm, mode: multi_lora, precision: bf16, device: cuda, options: {lora_delivery: prefetch}}"], r"lora_delivery: prefetch reads \.npy files.*no bfloat16"),
    "DashInfer on an unsupported architecture": (["--set", "base_model=builtin:tiny-phi3", "--set", "adapters.0.lora.target_modules=[qkv_proj]", "--set", "targets.0={name: di, backend: dashinfer}"], r"targets\.di: DashInfer serves LlamaForCausalLM, Qwen2ForCausalLM through ftd, not Phi3ForCausalLM"),
    "multi-LoRA target with the builder's adapter_path": (["--set", "targets.0={name: ml, mode: multi_lora, options: {extra_options: {adapter_path: /x}}}"], r"targets\.ml\.options\.extra_options: adapter_path bakes one adapter into the graph"),
    "unknown backend option": (["--set", "targets.0={name: trt, backend: tensorrt_llm, mode: multi_lora, precision: fp16, device: cuda, options: {max_rank: 8}}"], r"targets\.trt\.options: unknown key `max_rank`"),
}  # fmt: skip


def _assert_clean_failure(result, pattern: str, artifacts: Path) -> None:
    assert result.code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("ftd: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    # Nothing computed, nothing tracked: the store and the MLflow database were never created.
    assert not (artifacts / "store").exists()
    assert not (artifacts / "mlflow.db").exists()


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`ftd run ...` through `app.cli.main` in this process; the environment it sets is restored."""
    from app.cli import main

    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(("PREFECT_", "MLFLOW_"))]:
        monkeypatch.delenv(name)

    def run(artifacts: Path, *args: str, config: Path = DEFAULT_CONFIG) -> CliResult:
        capsys.readouterr()
        code = main(["run", str(config), "--set", f"artifacts_dir={artifacts}", *args])
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err, None)

    yield run
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_compute(case: str, artifacts: Path, in_process) -> None:
    overrides, pattern = CASES[case]
    result = run_ftd(artifacts, *overrides) if case in SUBPROCESS else in_process(artifacts, *overrides)
    _assert_clean_failure(result, pattern, artifacts)


def test_malformed_yaml_names_file_and_line(tmp_path: Path, artifacts: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_CONFIG.read_text().replace("  - name: numbers", "  - name: numbers\n   data: [unclosed"))
    result = run_ftd(artifacts, config=bad)
    _assert_clean_failure(result, rf"{bad}: malformed YAML at line \d+, column \d+", artifacts)


def test_missing_config_file(artifacts: Path, in_process) -> None:
    result = in_process(artifacts, config=Path("configs/nope.yaml"))
    _assert_clean_failure(result, r"config file not found: configs/nope\.yaml", artifacts)


def test_validate_accepts_the_default(artifacts: Path) -> None:
    result = run_ftd(artifacts, command="validate")
    assert result.code == 0, result.stderr
    assert "is valid: 1 adapter(s), 1 target(s)" in result.stdout


# ---------------------------------------------------------------- engine limits, at pre-flight


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    """Local base models whose shapes some engine cannot run (tiny, random, with the builtin tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftd.builtin_models import TinyRecipe, train_tokenizer

    shapes = {
        "head size 8": {"hidden_size": 32},  # 4 heads of 8
        "rope_theta 500000": {"rope_theta": 500000.0},
        "dynamic rope": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    }
    tokenizer = train_tokenizer(TinyRecipe(architecture="LlamaForCausalLM"))
    models = {}
    for name, extra in shapes.items():
        config = LlamaConfig(**{"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                                "max_position_embeddings": 128, **extra})  # fmt: skip
        out = tmp_path_factory.mktemp("odd") / name.replace(" ", "-")
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        models[name] = out
    return models


ENGINE_LIMITS = {
    "og CPU attention with head size 8": ("head size 8", "targets.0={name: og, backend: onnx_genai}",
                                          r"^ftd: config error: targets\.og: ONNX Runtime's GroupQueryAttention CPU kernel needs a head size that is a multiple of 16 .*this base model has head size 8"),
    "DashInfer with rope_theta 500000": ("rope_theta 500000", "targets.0={name: di, backend: dashinfer}",
                                         r"targets\.di: DashInfer 1\.3\.0 rotates Llama heads with base 10000 whatever rope_theta says; this base model has rope_theta 500000"),
    "llama.cpp with a RoPE scaling it cannot carry": ("dynamic rope", "targets.0={name: gg, backend: llama_cpp, precision: f32}",
                                                      r"targets\.gg: llama\.cpp's converter carries RoPE scaling of type linear, yarn, llama3, longrope, su .*uses 'dynamic'"),
    "llama.cpp q8_0 KV cache with head size 16": (None, "targets.0={name: gg, backend: llama_cpp, precision: f32, options: {kv_cache_type: q8_0}}",
                                                  r"targets\.gg: llama\.cpp quantises a q8_0 KV cache in blocks of 32 along each head; this base model has head size 16"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ENGINE_LIMITS))
def test_a_shape_an_engine_cannot_run_is_refused_at_preflight(case, odd_models, artifacts: Path, in_process) -> None:
    """Found in the engines' own sources (docs/backends.md): each would otherwise fail after training,
    in the build or the smoke test, or serve wrong answers without an error."""
    model, target, pattern = ENGINE_LIMITS[case]
    base = ["--set", f"base_model={odd_models[model]}"] if model else []
    _assert_clean_failure(in_process(artifacts, *base, "--set", target), pattern, artifacts)


def test_a_pickled_adapter_is_refused_at_preflight(tmp_path: Path, artifacts: Path, in_process) -> None:
    """A legacy adapter_model.bin that is not plain tensors exits 2 before compute, naming the file."""
    import datetime
    import json
    import pickle

    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                             "peft_type": "LORA"}))  # fmt: skip
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": datetime.date(2026, 1, 1)}))
    result = in_process(artifacts, "--set", f"adapters.0={{name: numbers, import_from: {adapter}, data: "
                        "{train: data/numbers/train.jsonl, eval: data/numbers/eval.jsonl}}")  # fmt: skip
    assert result.code == 2
    _assert_clean_failure(result, rf"adapters\.numbers\.import_from: {adapter}/adapter_model\.bin: refused: not a plain tensor file", artifacts)


# ---------------------------------------------------------------- memory, at pre-flight


def _llama_2_7b() -> tuple[dict, dict]:
    from bench.synth import REAL_SHAPES, shapes_of

    config = REAL_SHAPES["llama-2-7b"]()
    config.dtype = "bfloat16"
    return config.to_dict(), {name: shape for name, shape in shapes_of(config).items() if len(shape) == 2}


def test_a_gate_that_cannot_fit_this_machine_is_refused_before_compute() -> None:
    """A 7B-class bf16 model on a 24 GB machine: its int4 and q4_k_m engines fit, an fp32 engine
    (27 GB) does not, and the reference (13.5 GB bf16) does not fit a 12 GB machine."""
    from flows.preflight import check_memory
    from ftd.config import load_config

    model_config, shapes = _llama_2_7b()
    fits = ["targets.0={name: og-int4, precision: int4}", "targets.1={name: gguf, backend: llama_cpp, precision: q4_k_m}"]
    cfg = load_config(DEFAULT_CONFIG, fits)
    check_memory(cfg, model_config, shapes, 24_000_000_000)
    cfg = load_config(DEFAULT_CONFIG, [*fits, "targets.2={name: og-fp32, precision: fp32}"])
    with pytest.raises(Exception, match=r"targets\.og-fp32: its fp32 engine of this 6\.74B-parameter model holds ~27\.0 GB"):
        check_memory(cfg, model_config, shapes, 24_000_000_000)
    with pytest.raises(Exception, match=r"base_model: the parity gate's PyTorch reference holds the 6\.74B-parameter model \(13\.5 GB in bfloat16\)"):
        check_memory(load_config(DEFAULT_CONFIG, fits), model_config, shapes, 12_000_000_000)


def test_the_memory_refusal_reaches_the_user_as_one_line(artifacts: Path, in_process, monkeypatch) -> None:
    import flows.preflight

    monkeypatch.setattr(flows.preflight, "machine_memory_bytes", lambda: 1_000_000_000)
    result = in_process(artifacts)
    assert result.code == 2
    _assert_clean_failure(result, r"base_model: the parity gate's PyTorch reference .* this machine has 1\.0 GB", artifacts)
