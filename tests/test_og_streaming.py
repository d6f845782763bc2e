"""The streamed og builder (tasks/backends/onnx_genai/streaming.py) writes the stock builder's
engine: the same nodes and the same initializer bytes, for fp32 and int4 graphs of bf16
checkpoints with untied (Llama) and tied (Qwen2, q/k/v biases) embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BUILD_ALL = """
import json, runpy, sys, warnings
if sys.argv[1] == "streamed":
    from tasks.backends.onnx_genai import streaming
    streaming.install()
for job in json.loads(sys.argv[2]):
    sys.argv = ["builder", "-i", job["model"], "-o", job["out"], "-p", job["precision"], "-e", "cpu", "-c", job["out"] + "/.cache"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def _checkpoint(out: Path, architecture: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from ftd.builtin_models import TinyRecipe, train_tokenizer

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3)  # fmt: skip
    config = (LlamaConfig(**common) if architecture == "llama"
              else Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False))  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    train_tokenizer(TinyRecipe(architecture="LlamaForCausalLM")).save_pretrained(out)
    return out


def _graph(engine: Path) -> tuple[list, dict]:
    import onnx

    model = onnx.load(str(engine / "model.onnx"), load_external_data=True)
    nodes = sorted(
        (n.op_type, n.name, tuple(n.input), tuple(n.output),
         tuple(sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in n.attribute)))
        for n in model.graph.node
    )  # fmt: skip
    tensors = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    return nodes, tensors


@pytest.mark.e2e
def test_streamed_builder_writes_the_stock_builders_engine(tmp_path: Path) -> None:
    jobs = {"stock": [], "streamed": []}
    for arch in ("llama", "qwen2"):
        model = _checkpoint(tmp_path / arch, arch)
        for precision in ("fp32", "int4"):
            for kind in jobs:
                jobs[kind].append({"model": str(model), "out": str(tmp_path / kind / f"{arch}-{precision}"),
                                   "precision": precision})  # fmt: skip
    for kind, todo in jobs.items():
        proc = subprocess.run([sys.executable, "-c", BUILD_ALL, kind, json.dumps(todo)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for stock, streamed in zip(jobs["stock"], jobs["streamed"]):
        nodes_a, tensors_a = _graph(Path(stock["out"]))
        nodes_b, tensors_b = _graph(Path(streamed["out"]))
        assert nodes_a == nodes_b, stock["out"]
        assert tensors_a.keys() == tensors_b.keys(), stock["out"]
        differing = [name for name in tensors_a if tensors_a[name] != tensors_b[name]]
        assert differing == [], (stock["out"], differing[:5])
        if stock["precision"] == "int4":
            assert any(n[0] == "MatMulNBits" for n in nodes_b)
            assert not any(n[0] == "MatMul" and n[2][1] in tensors_b for n in nodes_b)  # every weight quantised
