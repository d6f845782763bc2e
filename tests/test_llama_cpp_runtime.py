"""llama.cpp itself, against peft: two random adapters (rsLoRA with an alpha pattern; mixed ranks)
converted to LoRA GGUFs over one base GGUF, switched on one loaded model, each reproducing its
own peft logits; the same adapter converted without ftd's scale folding does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ftd.store import Store
from tasks.backends.llama_cpp import convert, tools
from tasks.backends.llama_cpp.runtime import LoadedGguf
from tasks.base_model import model_dir, parse_base, resolve_base

REASON = tools.unavailable_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=f"llama.cpp backend: {REASON}")]
PROMPTS = ([5, 17, 33, 101, 7], [60, 61, 62], [200, 3, 99, 150, 42, 8, 19])
STEPS = 4
ADAPTERS = {  # name -> peft LoraConfig settings; init_lora_weights=False: B is random, not zero
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"v_proj": 16},
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "mixed": {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}  # fmt: skip


def peft_steps(base_dir: Path, adapter_path: Path | None) -> list[list[np.ndarray]]:
    """Greedy logits of every step, per prompt, from transformers (+ peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids, steps = list(prompt), []
            for _ in range(STEPS):
                logits = model(torch.tensor([ids])).logits[0, -1].numpy()
                steps.append(logits)
                ids.append(int(logits.argmax()))
            out.append(steps)
    return out


def gguf_steps(model: LoadedGguf, adapter: str | None) -> list[list[np.ndarray]]:
    return [[logits for _, logits in model.tokens(list(p), STEPS, eos_ids=[], adapter=adapter)] for p in PROMPTS]


def worst(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    return max(float(np.abs(x - y).max()) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llama-cpp")
    store = Store(root / "store")
    base = resolve_base(parse_base("builtin:tiny-llama"), store)
    adapters, references = {}, {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir(base)),
                               LoraConfig(init_lora_weights=False, **settings))  # fmt: skip
        with torch.no_grad():  # large enough updates that a wrong scale shows in the logits
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(20)

        def write(tmp: Path, model=model, name=name) -> dict:
            model.save_pretrained(tmp / "adapter")
            return {"adapter_name": name}

        adapters[name] = store.materialize("adapter", f"test-{name}", write)
        references[name] = peft_steps(model_dir(base), adapters[name].path(store) / "adapter")
    references[None] = peft_steps(model_dir(base), None)
    gguf = convert.convert_model(base, "f32", "gpt-2", store)
    loras = {name: convert.convert_adapter(base, a, "f32", store) for name, a in adapters.items()}
    loaded = LoadedGguf(gguf.path(store) / convert.MODEL_FILE,
                        {n: a.path(store) / convert.LORA_FILE for n, a in loras.items()},
                        n_ctx=64, n_threads=1, kv_type="f32")  # fmt: skip
    yield {"store": store, "base": base, "adapters": adapters, "loras": loras, "loaded": loaded,
           "references": references}  # fmt: skip
    loaded.close()


def test_each_adapter_switched_on_one_model_matches_its_own_peft_logits(setup) -> None:
    """A, B, none, B, A on one loaded base: the second visit of each equals its reference too
    (a reused KV cache after a switch would not)."""
    model, refs = setup["loaded"], setup["references"]
    for adapter in ("rslora", "mixed", None, "mixed", "rslora"):
        assert worst(gguf_steps(model, adapter), refs[adapter]) < 1e-3, adapter  # logits ~±5 here
    assert worst(refs["rslora"], refs["mixed"]) > 0.1  # the adapters differ: the check can tell them apart


def test_the_gguf_holds_the_folded_scale_and_alpha_zero(setup) -> None:
    lora = setup["loras"]["rslora"]
    assert lora.meta["metadata"]["adapter.lora.alpha"] == 0
    assert lora.meta["folding"]["was_rslora"] and lora.meta["folding"]["max_delta_rel_error"] < 1e-6
    assert lora.meta["tensor_types"] == {"F32": 2 * 7 * 2}  # A and B of 7 modules in 2 layers


def test_without_folding_the_rslora_adapter_answers_differently(setup, tmp_path: Path) -> None:
    """The same adapter given to llama.cpp's converter as peft saved it (alpha 4 over r 8, as
    alpha / r): its logits miss peft's, so the test above would fail if ftd did not fold."""
    store, base = setup["store"], setup["base"]
    raw = tmp_path / "raw.gguf"
    convert.run_worker("convert-lora", {"base_dir": str(model_dir(base)), "out": str(raw), "outtype": "f32",
                                        "adapter_dir": str(setup["adapters"]["rslora"].path(store) / "adapter")},
                       tmp_path / "log", "convert unfolded")  # fmt: skip
    gguf = convert.convert_model(base, "f32", "gpt-2", store)
    unfolded = LoadedGguf(gguf.path(store) / convert.MODEL_FILE, {"raw": raw}, n_ctx=64, n_threads=1, kv_type="f32")
    assert worst(gguf_steps(unfolded, "raw"), setup["references"]["rslora"]) > 0.1


def test_llama_cpp_tokenises_like_the_hf_tokenizer(setup) -> None:
    gguf = convert.convert_model(setup["base"], "f32", "gpt-2", setup["store"])
    assert gguf.meta["pre_tokenizer_fallback"] == "gpt-2"  # the builtin's BPE is unknown to llama.cpp
    check = gguf.meta["tokenizer_check"]
    assert check["texts"] == check["identical"] >= 10


def test_a_tokenizer_llama_cpp_does_not_reproduce_fails_the_check(setup, tmp_path: Path) -> None:
    """The HF tokenizer lower-cases (a normalizer the GGUF does not carry): llama-server would
    tokenise prompts differently, so the conversion must fail, naming a differing text."""
    from ftd.errors import FtdError

    folder = tmp_path / "lowercasing"
    shutil.copytree(model_dir(setup["base"]), folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    gguf = convert.convert_model(setup["base"], "f32", "gpt-2", setup["store"])
    with pytest.raises(FtdError, match="llama.cpp tokenises [0-9]+ of [0-9]+ probe texts differently .*'Hello world'"):
        convert.check_tokenizer(folder, gguf.path(setup["store"]) / convert.MODEL_FILE)


def test_quantised_types_are_recorded_tensor_by_tensor(setup) -> None:
    gguf = convert.convert_model(setup["base"], "f32", "gpt-2", setup["store"])
    q4 = convert.quantize_model(gguf, "q4_0", setup["store"])
    # the 176-wide down projections (not a multiple of 32) fall back to F16; norms stay F32
    assert q4.meta["tensor_types"] == {"F16": 2, "F32": 5, "Q4_0": 13, "Q8_0": 1}
    assert q4.meta["bytes"] < gguf.meta["bytes"] / 3
    # K-quants need rows that are multiples of 256: the 64-wide builtin falls back, and says so
    k = convert.quantize_model(gguf, "q4_k_m", setup["store"])
    assert "Q4_K" not in k.meta["tensor_types"] and set(k.meta["tensor_types"]) - {"F32"}
