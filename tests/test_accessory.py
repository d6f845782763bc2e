"""LLaMA2-Accessory export: a tiny random GQA Llama (several safetensors shards) exported at
model-parallel sizes 1/2/4, read back from the format alone, and run through an independent
Meta-style forward whose logits must equal the HF model's; broken exports must fail that check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftd.errors import FtdError
from tasks.backends.accessory import export as accessory
from tasks.backends.accessory.export import AccessoryLlama, export_accessory, load_accessory

VOCAB, TOL = 96, 1e-5


def _tiny_llama(root: Path, tied: bool = False, **overrides) -> tuple[Path, torch.nn.Module]:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=tied, bos_token_id=1,
                         eos_token_id=2, **overrides)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # large weights so a wrong rotary layout or a swap changes logits visibly
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.15)
    path = root / ("tied" if tied else "llama")
    model.save_pretrained(path, max_shard_size="100KB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path, model = _tiny_llama(tmp_path_factory.mktemp("hf"))
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    return path, model


TOKENS = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))


def _export(src: Path, out: Path, mp: int) -> dict:
    out.mkdir()
    return export_accessory(src, out, model_parallel_size=mp)


def _max_diff(ckpt: Path, hf_model: torch.nn.Module) -> float:
    """max |Δlogit| against HF; inf when the checkpoint cannot even be reassembled."""
    try:
        args, state = load_accessory(ckpt)
    except FtdError:
        return math.inf
    with torch.no_grad():
        want = hf_model(TOKENS).logits
    return (AccessoryLlama(args, state)(TOKENS) - want).abs().max().item()


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_logits_match_hf_at_every_model_parallel_size(llama, tmp_path, mp):
    src, model = llama
    meta = _export(src, tmp_path / "acc", mp)
    assert meta["model_parallel_size"] == mp and len(meta["shards"]) == mp
    diff = _max_diff(tmp_path / "acc", model)
    print(f"mp={mp} max|dlogit|={diff:.2e}")
    assert diff < TOL


def test_tied_embeddings_write_output_from_the_embedding(tmp_path):
    src, model = _tiny_llama(tmp_path, tied=True)
    _export(src, tmp_path / "acc", 2)
    _, state = load_accessory(tmp_path / "acc")
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert _max_diff(tmp_path / "acc", model) < TOL


def _swap_w1_w3(monkeypatch):
    monkeypatch.setitem(accessory.LAYER_NAMES, "mlp.gate_proj", "feed_forward.w3")
    monkeypatch.setitem(accessory.LAYER_NAMES, "mlp.up_proj", "feed_forward.w1")


def _wo_on_dim0(monkeypatch):
    right = accessory._split_dim
    monkeypatch.setattr(accessory, "_split_dim", lambda name: 0 if "attention.wo" in name else right(name))


BREAKAGES = {
    "no_qk_unpermute": lambda m: m.setattr(accessory, "_unpermute", lambda w, n_heads: w),
    "wo_split_on_dim0": _wo_on_dim0,
    "w1_w3_swapped": _swap_w1_w3,
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_exports_fail_the_logits_check(llama, tmp_path, monkeypatch, breakage):
    src, model = llama
    BREAKAGES[breakage](monkeypatch)
    _export(src, tmp_path / "acc", 2)
    monkeypatch.undo()  # read back with the real code
    assert _max_diff(tmp_path / "acc", model) > 1e-2


def test_shard_files_and_configs(llama, tmp_path):
    src, _ = llama
    out, mp = tmp_path / "acc", 2
    meta = _export(src, out, mp)
    names = sorted(p.name for p in out.glob("*.pth"))
    assert names == ["consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth"]
    _, full = load_accessory(out)
    shards = [torch.load(out / n, weights_only=True, map_location="cpu")["model"] for n in names]
    assert all(k.startswith("llma.") for s in shards for k in s) and shards[0].keys() == shards[1].keys()
    assert shards[0]["llma.layers.0.attention.wq.weight"].shape == (32, 64)
    assert shards[0]["llma.layers.0.attention.wk.weight"].shape == (16, 64)
    assert shards[0]["llma.layers.1.attention.wo.weight"].shape == (64, 32)
    assert shards[0]["llma.layers.0.feed_forward.w2.weight"].shape == (64, 48)
    assert shards[0]["llma.tok_embeddings.weight"].shape == (VOCAB, 32)
    assert shards[0]["llma.output.weight"].shape == (VOCAB // 2, 64)
    for rank, shard in enumerate(shards):
        w1 = full["layers.1.feed_forward.w1.weight"]
        assert torch.equal(shard["llma.layers.1.feed_forward.w1.weight"], w1[48 * rank : 48 * (rank + 1)])
        assert torch.equal(shard["llma.layers.0.ffn_norm.weight"], full["layers.0.ffn_norm.weight"])
        assert torch.equal(shard["llma.norm.weight"], full["norm.weight"])
    total = sum(v.numel() for v in full.values()) * 4
    assert all(s["bytes"] < 0.6 * total for s in meta["shards"])  # chunk views would save whole tensors
    config = json.loads((out / "config.json").read_text())
    assert config == {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": VOCAB,
                      "multiple_of": 96, "ffn_dim_multiplier": 96 / 170, "norm_eps": 1e-6, "rope_theta": 1000.0,
                      "max_seq_len": 64}  # fmt: skip
    assert json.loads((out / "meta.json").read_text()) == {"llama_type": "llama"}
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    (out / names[1]).unlink()
    with pytest.raises(FtdError, match="incomplete"):
        load_accessory(out)


def test_dtype_cast(llama, tmp_path):
    (tmp_path / "bf16").mkdir()
    meta = export_accessory(llama[0], tmp_path / "bf16", 1, dtype="bfloat16")
    _, state = load_accessory(tmp_path / "bf16")
    assert meta["dtype"] == "bfloat16" and all(v.dtype == torch.bfloat16 for v in state.values())


@pytest.mark.parametrize(
    ("dim", "intermediate", "want"),
    [(4096, 11008, (256, None)), (4096, 14336, None), (64, 96, None), (2048, 5632, (256, None))],
)
def test_ffn_args_reproduce_intermediate_size(dim, intermediate, want):
    multiple_of, mult = accessory._ffn_args(dim, intermediate, Path("config.json"))
    assert accessory.accessory_hidden_dim(dim, multiple_of, mult) == intermediate
    if want:
        assert (multiple_of, mult) == want


def test_refusals(llama, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src, _ = llama
    qwen = tmp_path / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(qwen)  # fmt: skip
    with pytest.raises(FtdError, match=r"Qwen2ForCausalLM.*biases"):
        _export(qwen, tmp_path / "q", 1)
    with pytest.raises(FtdError, match=r"num_attention_heads=8 is not divisible by model_parallel_size=3"):
        _export(src, tmp_path / "mp3", 3)
    with pytest.raises(FtdError, match=r"num_key_value_heads=4 is not divisible by model_parallel_size=8"):
        _export(src, tmp_path / "mp8", 8)
    biased, _ = _tiny_llama(tmp_path, attention_bias=True)
    with pytest.raises(FtdError, match=r"attention_bias=True"):
        _export(biased, tmp_path / "b", 1)
    (tmp_path / "b" / "stale.txt").write_text("")
    with pytest.raises(FtdError, match=r"must exist and be empty"):
        export_accessory(src, tmp_path / "b", 1)


def test_greedy_matches_hf_generate(llama, tmp_path):
    src, model = llama
    _export(src, tmp_path / "acc", 2)
    engine = AccessoryLlama(*load_accessory(tmp_path / "acc"))
    for prompt in ([1, 5, 9, 33], [1, 70], [1, 3, 3, 3, 40, 41, 42]):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=[2], pad_token_id=2)  # fmt: skip
        want = out[0, len(prompt) :].tolist()
        assert engine.greedy(prompt, 8, [2]) == want
        assert len(want) > 0


def test_prompt_templates_match_the_seed():
    assert accessory.alpaca_prompt("What's the best programming language in the world?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat's the best programming language in the world?\n\n### Response:"
    )
    assert accessory.alpaca_prompt("Add.", "  ") == accessory.alpaca_prompt("Add.")
    assert accessory.alpaca_prompt("Add.", "1 2").endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:")
    q1, a1 = "What's the best programming language in the world?", "The best programming language in the world in PHP."
    assert accessory.conversation_prompt([(q1, a1), ("Are you sure? Why not Python?", None)]) == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n"
        f"### Human: {q1}\n### Assistant: {a1}\n### Human: Are you sure? Why not Python?\n### Assistant:"
    )
    assert accessory.STOP_SIGNAL == "###"
    with pytest.raises(FtdError, match="only the last answer"):
        accessory.conversation_prompt([("a", None), ("b", None)])
