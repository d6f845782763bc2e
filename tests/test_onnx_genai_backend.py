"""onnx_genai backend: option validation, genai_config I/O from the graph, and the optimum path's
engine against PyTorch (same `OgEngine.greedy` as the parity gate)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from tasks.backends.onnx_genai.backend import OnnxGenAI
from tasks.backends.onnx_genai.builder import decoder_io, exporter_of
from tests.conftest import run_ftd

LLAMA = "LlamaForCausalLM"


def _target(precision: str = "fp32", device: str = "cpu", **options) -> TargetConfig:
    return TargetConfig(name="t1", precision=precision, device=device, options=options)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [{}, {"exporter": "builder"}, {"exporter": "optimum"}, {"exporter": "optimum", "extra_options": {"x": 1}},
     {"extra_options": {"int4_block_size": 32}}],
)  # fmt: skip
def test_valid_options_pass(options: dict) -> None:
    OnnxGenAI().check(_target(**options), LLAMA)


def test_exporter_defaults_to_builder() -> None:
    assert exporter_of(_target()) == "builder"
    assert exporter_of(_target(exporter="optimum")) == "optimum"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (_target(exporter="tensorrt"), r"targets\.t1\.options\.exporter: 'tensorrt' is not one of builder, optimum"),
        (_target(exporter=None), r"targets\.t1\.options\.exporter: None is not one of builder, optimum"),
        (_target(exportr="optimum"), r"targets\.t1\.options: unknown key\(s\) \['exportr'\] \(known: extra_options, exporter\)"),
        (_target(extra_options=["a=b"]), r"targets\.t1\.options\.extra_options: expected a mapping"),
        (_target("int4", exporter="optimum"),
         r"targets\.t1\.options\.exporter: 'optimum' builds only fp32/cpu \(this target is int4/cpu\); use exporter 'builder' for .*int4/cpu"),
        (_target("fp16", "cuda", exporter="optimum"), r"targets\.t1\.options\.exporter: 'optimum' builds only fp32/cpu \(this target is fp16/cuda\)"),
        (_target("fp32", "cuda", exporter="optimum"), r"targets\.t1\.options\.exporter: 'optimum' builds only fp32/cpu"),
        (_target(exporter="optimum", extra_options={"config_only": "true"}), r"targets\.t1\.options\.extra_options: config_only is set by"),
        (_target("fp8"), r"targets\.t1: precision 'fp8' on device 'cpu' is not supported by onnx_genai"),
    ],
)  # fmt: skip
def test_bad_options_name_the_field(target: TargetConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OnnxGenAI().check(target, LLAMA)


def test_optimum_exporter_refuses_multi_lora_mode() -> None:
    target = TargetConfig(name="t1", mode="multi_lora", options={"exporter": "optimum"})
    with pytest.raises(ConfigError, match=r"targets\.t1\.options\.exporter: 'optimum' exports merged engines only"):
        OnnxGenAI().check(target, LLAMA)


def test_bad_exporter_through_the_cli_fails_before_compute(artifacts: Path) -> None:
    result = run_ftd(artifacts, "--set", "targets.0.options.exporter=optimum", "--set", "targets.0.precision=int4")
    assert result.code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "ftd: config error: targets.onnx-fp32.options.exporter: 'optimum' builds only"
    )
    assert not (artifacts / "store").exists()


# ---------------------------------------------------------------- genai_config decoder I/O


def _io(layers: int = 2, position_ids: bool = True, extra_inputs: tuple[str, ...] = ()) -> dict:
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else []) + list(extra_inputs)
    inputs += [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return {"inputs": inputs, "outputs": outputs, "shapes": {}, "gqa": False}


def test_decoder_io_comes_from_the_graph_names() -> None:
    assert decoder_io(_io(), 2, "g") == {
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }  # fmt: skip
    assert "position_ids" not in decoder_io(_io(position_ids=False), 2, "g")["inputs"]


@pytest.mark.parametrize(
    ("io", "layers", "message"),
    [
        (_io(extra_inputs=("cache_position",)), 2, r"cannot feed/read \['cache_position'\]"),
        (_io(layers=1), 2, r"expected 2 layers of 'past_key_values\.%d\.key'"),
        ({"inputs": ["input_ids"], "outputs": ["logits"], "shapes": {}, "gqa": False}, 2, "not a decoder with past"),
    ],
)
def test_decoder_io_refuses_graphs_og_cannot_drive(io: dict, layers: int, message: str) -> None:
    with pytest.raises(FtdError, match=message):
        decoder_io(io, layers, "g")


# ---------------------------------------------------------------- optimum engine vs PyTorch

needs_tools = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("optimum", "onnxruntime_genai", "onnx")),
    reason="optimum, onnx and onnxruntime-genai are needed to build the engine",
)


@needs_tools
def test_optimum_engine_matches_pytorch(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftd.builtin_models import build_tiny_model
    from tasks.smoke import torch_greedy

    merged, engine_dir = tmp_path / "merged", tmp_path / "engine"
    build_tiny_model("tiny-llama", merged)
    engine_dir.mkdir()
    backend, target = OnnxGenAI(), _target(exporter="optimum")
    backend.check(target, LLAMA)
    meta = backend.build(merged, target, engine_dir)

    assert meta["exporter"] == "optimum"
    assert meta["commands"][0].startswith("python -m optimum.exporters.onnx --model <merged model dir> ")
    assert "--extra_options config_only=true" in meta["commands"][1]
    assert str(tmp_path) not in meta["command"]
    assert sorted(p.name for p in engine_dir.iterdir() if p.name.startswith((".", "model"))) == ["model.onnx"]
    config = json.loads((engine_dir / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    engine = backend.open(engine_dir, target)
    eos = [tokenizer.eos_token_id]
    for text in ("what is 12 plus 30?", "hello", "count: 1 2 3 4 5 6 7 8 9 10 11 12"):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ref, got = torch_greedy(model, ids, 6, eos, tokenizer), engine.greedy(ids, 6, eos)
        assert got.tokens == ref.tokens, text
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ref.logits, got.logits))
        assert diff < 1e-3, (text, diff)
    assert re.search(r"optimum\.exporters\.onnx", (engine_dir / "build.log").read_text())


BUILDER_OUTPUT = """GroupQueryAttention (GQA) is used in this model.
Reading embedding layer
Reading layer 0
Reading layer 1
Reading final norm
Reading LM head
Saving ONNX model in /tmp/x
0it [00:00, ?it/s]
Saving model.embed_tokens.weight (f32, [396,64]):   5%|▌         | 1/19 [00:00<00:00, 1256.91it/s]
Saving model.layers.1.mlp.up_proj.MatMul.weight (f32, [64,176]):  84%|████████▍ | 16/19 [00:00<00:00, 4667.79it/s]
Saving lm_head.MatMul.weight (f32, [64,396]): 100%|██████████| 19/19 [00:00<00:00, 4800.00it/s]"""


def test_builder_output_becomes_progress(caplog, tmp_path: Path) -> None:
    """The builder's own lines (layers read, tensors saved) drive the build's progress."""
    import logging

    from tasks.backends.onnx_genai.builder import BuilderProgress

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    progress = BuilderProgress("build onnx-fp32", tmp_path)
    progress.progress.every = 0.0  # report every line
    with caplog.at_level(logging.INFO, logger="ftd.progress"):
        for line in BUILDER_OUTPUT.splitlines():
            progress(line)
    shown = [r.getMessage() for r in caplog.records]
    percents = [int(re.search(r"\((\d+)%\)$", m)[1]) for m in shown]
    assert percents == sorted(percents) and percents[-1] == 100
    assert shown[1] == "build onnx-fp32: layer 0 (24%)"
    assert shown[-1] == "build onnx-fp32: saving tensor 19/19 (100%)"
