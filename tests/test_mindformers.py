"""MindFormers conversion: HF -> MindFormers -> HF is exact, broken tables are caught, the predict YAML matches."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tasks.backends.mindspore.convert as mf
from ftd.errors import FtdError

MF_NAME = re.compile(
    r"^(model\.tok_embeddings\.embedding_weight|model\.norm_out\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight|"
    r"model\.layers\.\d+\.attention\.w[qkv]\.bias)$"
)


def tiny_model(root: Path, architecture: str) -> Path:
    """A 2-layer model with random (non-zero) weights, biases included, saved in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if architecture == "LlamaForCausalLM":
        model = LlamaForCausalLM(LlamaConfig(**sizes, rope_theta=50000.0, rms_norm_eps=1e-5))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    path = root / architecture
    model.save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"}}))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (path / name).write_text("{}")
    return path


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: tiny_model(root, arch) for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM")}


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_round_trip_is_exact(models, tmp_path, architecture):
    merged = models[architecture]
    assert (merged / "model.safetensors.index.json").is_file() and len(list(merged.glob("*.safetensors"))) > 2
    meta = mf.convert_to_mindformers(merged, tmp_path, architecture)
    converted = load_file(tmp_path / mf.SAFETENSORS_NAME)
    assert all(MF_NAME.match(name) for name in converted), sorted(converted)
    for name in ("model.tok_embeddings.embedding_weight", "model.norm_out.weight", "model.layers.0.attention.wq.weight",
                 "model.layers.1.feed_forward.w1.weight", "model.layers.1.ffn_norm.weight"):  # fmt: skip
        assert name in converted
    original = hf_state(merged)
    back = mf.mindformers_to_hf(tmp_path / mf.SAFETENSORS_NAME, architecture)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert meta["tensors"] == len(original) and meta["round_trip"] == "exact"
    assert meta["key_map"]["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.feed_forward.w3.weight"
    if architecture == "Qwen2ForCausalLM":  # biases kept; tied embeddings: no lm_head, MindFormers ties it
        assert "model.layers.1.attention.wv.bias" in converted and "lm_head.weight" not in converted
    else:
        assert "lm_head.weight" in converted and not any(k.endswith(".bias") for k in converted)
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()


def test_dtype_cast_round_trips(models, tmp_path):
    meta = mf.convert_to_mindformers(models["LlamaForCausalLM"], tmp_path, "LlamaForCausalLM", dtype="bfloat16")
    back = mf.mindformers_to_hf(tmp_path / mf.SAFETENSORS_NAME, "LlamaForCausalLM")
    original = hf_state(models["LlamaForCausalLM"])
    assert all(torch.equal(back[k], original[k].to(torch.bfloat16)) for k in original)
    config = yaml.safe_load((tmp_path / "predict_llama.yaml").read_text())["model"]["model_config"]
    assert config["param_init_type"] == config["compute_dtype"] == "bfloat16" and meta["bytes"] > 0


def broken_table(architecture: str, edit) -> dict:
    return {pattern: edit(template) for pattern, template in mf.KEY_MAPS[architecture].items()}


def test_swapped_w1_w3_is_caught(models, tmp_path, monkeypatch):
    swap = {"feed_forward.w1": "feed_forward.w3", "feed_forward.w3": "feed_forward.w1"}

    def edit(template):
        return template and re.sub(r"feed_forward\.w[13]", lambda m: swap[m[0]], template)

    monkeypatch.setitem(mf.KEY_MAPS, "LlamaForCausalLM", broken_table("LlamaForCausalLM", edit))
    with pytest.raises(FtdError, match=r"round trip.*gate_proj.*different values"):
        mf.convert_to_mindformers(models["LlamaForCausalLM"], tmp_path, "LlamaForCausalLM")
    assert not (tmp_path / mf.SAFETENSORS_NAME).exists()  # a file that failed verification is not left behind
    # without the module's own check, this test's comparison catches it too: same names and shapes, other values
    monkeypatch.setattr(mf, "_round_trip", lambda *args: None)
    mf.convert_to_mindformers(models["LlamaForCausalLM"], tmp_path, "LlamaForCausalLM")
    back = mf.mindformers_to_hf(tmp_path / mf.SAFETENSORS_NAME, "LlamaForCausalLM")
    original = hf_state(models["LlamaForCausalLM"])
    assert back.keys() == original.keys() and all(back[k].shape == original[k].shape for k in original)
    assert not torch.equal(back["model.layers.0.mlp.gate_proj.weight"], original["model.layers.0.mlp.gate_proj.weight"])


def test_dropped_qwen2_biases_are_caught(models, tmp_path, monkeypatch):
    def edit(template):
        return None if template and template.endswith(".bias") else template

    monkeypatch.setitem(mf.KEY_MAPS, "Qwen2ForCausalLM", broken_table("Qwen2ForCausalLM", edit))
    with pytest.raises(FtdError, match=r"round trip.*self_attn\.[qkv]_proj\.bias is missing"):
        mf.convert_to_mindformers(models["Qwen2ForCausalLM"], tmp_path, "Qwen2ForCausalLM")
    monkeypatch.setattr(mf, "_round_trip", lambda *args: None)
    mf.convert_to_mindformers(models["Qwen2ForCausalLM"], tmp_path, "Qwen2ForCausalLM")
    back = mf.mindformers_to_hf(tmp_path / mf.SAFETENSORS_NAME, "Qwen2ForCausalLM")
    missing = hf_state(models["Qwen2ForCausalLM"]).keys() - back.keys()
    assert missing and all(k.endswith("_proj.bias") for k in missing)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_predict_yaml_matches_hf_config(models, tmp_path, architecture):
    mf.convert_to_mindformers(models[architecture], tmp_path, architecture)
    hf = json.loads((models[architecture] / "config.json").read_text())
    name = "predict_llama.yaml" if architecture == "LlamaForCausalLM" else "predict_qwen2.yaml"
    document = yaml.safe_load((tmp_path / name).read_text())
    config = document["model"]["model_config"]
    expected = {"hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
                "num_heads": hf["num_attention_heads"], "n_kv_heads": hf["num_key_value_heads"],
                "vocab_size": hf["vocab_size"], "intermediate_size": hf["intermediate_size"],
                "rms_norm_eps": hf["rms_norm_eps"], "theta": hf["rope_theta"],
                "max_position_embedding": hf["max_position_embeddings"], "eos_token_id": hf["eos_token_id"],
                "tie_word_embeddings": hf["tie_word_embeddings"], "qkv_has_bias": architecture == "Qwen2ForCausalLM",
                "type": "LlamaConfig", "use_past": True, "qkv_concat": False}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert document["model"]["arch"]["type"] == "LlamaForCausalLM"
    assert document["load_checkpoint"] == mf.SAFETENSORS_NAME and document["load_ckpt_format"] == "safetensors"
    tokenizer = document["processor"]["tokenizer"]
    assert tokenizer["eos_token"] == "</s>" and tokenizer["bos_token"] == "<s>"
    for key in ("vocab_file", "merges_file", "tokenizer_file"):
        if key in tokenizer:
            assert (tmp_path / tokenizer[key]).is_file()


def test_unsupported_architecture_is_refused(models, tmp_path):
    with pytest.raises(FtdError, match=r"Phi3ForCausalLM.*supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        mf.convert_to_mindformers(models["LlamaForCausalLM"], tmp_path, "Phi3ForCausalLM")
    with pytest.raises(FtdError, match=r"config.json: architectures=\['LlamaForCausalLM'\]"):
        mf.convert_to_mindformers(models["LlamaForCausalLM"], tmp_path, "Qwen2ForCausalLM")


def test_ckpt_written_only_with_mindspore(models, tmp_path):
    meta = mf.convert_to_mindformers(models["Qwen2ForCausalLM"], tmp_path, "Qwen2ForCausalLM")
    if importlib.util.find_spec("mindspore") is None:
        assert meta["ckpt"] == {"skipped": "mindspore is not installed (optional extra: pip install mindspore)"}
        assert not (tmp_path / mf.CKPT_NAME).exists() and mf.CKPT_NAME not in meta["files"]
    else:
        assert meta["ckpt"]["verified"] and meta["ckpt"]["tensors"] == meta["tensors"]
        assert (tmp_path / mf.CKPT_NAME).is_file()


def test_deploy_status_says_why(tmp_path):
    status = mf.ascend_deploy_status(tmp_path / "no-ascend")
    assert status.startswith("skipped:") and "no-ascend" in status
    if importlib.util.find_spec("mindspore_lite") is None:
        assert "no wheel for CPython 3.11" in status
