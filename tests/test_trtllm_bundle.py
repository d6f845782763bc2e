"""The TensorRT-LLM + Triton bundle (tasks/backends/tensorrt_llm/), built and checked on CPU.

Two adapters of different ranks on the builtin tiny Llama go through the real stage functions:
conversion, the (skipped) engine build, bundle writing and its verification. Then copies of the
bundle are broken one way each — the ways the TensorRT-LLM runtime rejects an adapter — and the
checks must name the adapter and the fix.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from ftd.store import Artifact, Store
from tasks.backends.registry import get_backend
from tasks.backends.tensorrt_llm import lora as trt
from tasks.backends.tensorrt_llm import stages, triton
from tasks.backends.tensorrt_llm.verify import verify_bundle
from tasks.base_model import model_dir, parse_base, resolve_base
from tests.test_trtllm_lora import make_peft

ADAPTERS = {"wide": {"r": 8, "lora_alpha": 16}, "narrow": {"r": 4, "lora_alpha": 4, "use_rslora": True,
                                                          "target_modules": ["q_proj", "v_proj", "down_proj"]}}  # fmt: skip


def trt_target(precision: str = "bf16", **options) -> TargetConfig:
    return TargetConfig(name=f"trt-{precision}", backend="tensorrt_llm", mode="multi_lora", precision=precision,
                        device="cuda", options=options)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    store = Store(tmp_path_factory.mktemp("trt-bundle") / "artifacts")
    base = resolve_base(parse_base("builtin:tiny-llama"), store)
    adapters = []
    for name, lora in ADAPTERS.items():

        def build(tmp: Path, lora=lora, name=name) -> dict:
            make_peft(model_dir(base), tmp / "adapter", **lora)
            for item in model_dir(base).glob("tokenizer*"):
                shutil.copy2(item, tmp / "adapter" / item.name)
            return {"adapter_name": name}

        adapters.append(store.materialize("adapter", f"test-{name}", build))
    return {"store": store, "base": base, "adapters": adapters}


def make_bundle(built: dict, target: TargetConfig) -> tuple[Artifact, Path]:
    store, base, adapters = built["store"], built["base"], built["adapters"]
    loras = [stages.convert_lora(a, target, store) for a in adapters]
    engine = stages.build_engine(base, loras, target, "LlamaForCausalLM", store)
    bundle = stages.assemble_bundle(base, adapters[0], adapters, loras, engine, target, "LlamaForCausalLM", store)
    return bundle, bundle.path(store)


def copy_bundle(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    return target


def test_bundle_is_complete_and_verified(built: dict):
    bundle, path = make_bundle(built, trt_target("bf16"))
    manifest = json.loads((path / "bundle.json").read_text())
    assert sorted(manifest["adapters"]) == ["narrow", "wide"]
    assert {n: a["ranks"] for n, a in manifest["adapters"].items()} == {"narrow": [4], "wide": [8]}
    assert manifest["engine"]["max_lora_rank"] == 8
    assert manifest["engine"]["lora_target_modules"] == sorted(trt.HF_TO_TRT[m] for m in
                                                               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    for model in triton.MODELS:
        assert (path / "model_repository" / model / "config.pbtxt").is_file()
        assert (path / "model_repository" / model / "1").is_dir()
    warmup = path / "model_repository" / "tensorrt_llm" / "warmup"
    expected = {"input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "beam_width"}
    for task_id in (1, 2):
        expected |= {f"lora_id_{task_id}", f"adapter_model_{task_id}.bin", f"adapter_config_{task_id}.bin"}
    assert {p.name for p in warmup.iterdir()} == expected
    # the engine could not be built here, and says why; the checks ran and are recorded
    assert bundle.meta["engine_built"] is False and "tensorrt_llm" in bundle.meta["engine_skip_reason"]
    assert (path / "model_repository/tensorrt_llm/1/ENGINE_NOT_BUILT.txt").is_file()
    assert bundle.meta["checks"]["warmup_entries"] == 2 and bundle.meta["checks"]["adapters_checked"] == 2
    assert bundle.meta["checks"]["max_delta_rel_error"] < 4 * 2**-7
    assert verify_bundle(path)["summary"] == bundle.meta["checks"]
    # end id and warm-up ids come from the experiment's tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    assert manifest["end_id"] == tokenizer.eos_token_id
    ids = np.frombuffer((warmup / "input_ids").read_bytes(), dtype="<i4").tolist()
    assert ids == tokenizer.encode(manifest["example_prompt"], add_special_tokens=False) and ids
    assert "Hello" in manifest["example_prompt"]
    # what a GPU user needs: the exact build command, the launch command, a request by lora_task_id
    readme = (path / "README.md").read_text()
    assert "trtllm-build --checkpoint_dir .trt_checkpoint" in readme and "--lora_plugin bfloat16" in readme
    assert (
        "--max_lora_rank 8" in readme and "tritonserver --model-repository" in (path / "launch_triton.sh").read_text()
    )
    assert (
        '"lora_task_id": 1' in readme and json.loads((path / "requests" / "wide.json").read_text())["lora_task_id"] == 1
    )
    assert (path / "build_engine.sh").stat().st_mode & 0o111


@pytest.mark.parametrize(("precision", "triton_type", "itemsize"),
                         [("bf16", "TYPE_BF16", 2), ("fp16", "TYPE_FP16", 2), ("fp32", "TYPE_FP32", 4)])  # fmt: skip
def test_lora_weights_declared_and_written_in_the_engine_dtype(built: dict, precision, triton_type, itemsize):
    _, path = make_bundle(built, trt_target(precision))
    for model in ("ensemble", "tensorrt_llm"):
        config = triton.parse((path / "model_repository" / model / "config.pbtxt").read_text())
        declared = {i.name: triton.type_name(i.data_type) for i in config.input}
        assert declared["lora_weights"] == triton_type and declared["lora_config"] == "TYPE_INT32"
    engine = triton.parse((path / "model_repository/tensorrt_llm/config.pbtxt").read_text())
    for warmup in engine.model_warmup:
        weights = warmup.inputs["lora_weights"]
        assert triton.type_name(weights.data_type) == triton_type
        size = (path / "model_repository/tensorrt_llm/warmup" / weights.input_data_file).stat().st_size
        assert size == int(np.prod(weights.dims)) * itemsize
    # the bytes are the adapter converted to that dtype (bf16: torch's rounding)
    converted = trt.convert("wide", built["adapters"][0].path(built["store"]) / "adapter", "fp32")
    raw = (path / "model_repository/tensorrt_llm/warmup/adapter_model_1.bin").read_bytes()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    assert raw == torch.from_numpy(converted.weights).to(torch_dtype).view(torch.uint8).numpy().tobytes()
    build = (path / "build_engine.sh").read_text()
    assert f"--lora_plugin {trt.DTYPES[precision]}" in build and f"--gemm_plugin {trt.DTYPES[precision]}" in build


def test_a_dtype_mismatch_cannot_be_produced(built: dict, tmp_path: Path, monkeypatch):
    """The stock configs declare TYPE_FP16 whatever the engine (tensorrtllm_backend #791). If the writer
    ever did that, the bundle stage fails before anything is stored; a hand-edited bundle fails the check."""
    target = trt_target("bf16", warmup_prompt="mismatch probe")
    original = triton.lora_inputs
    monkeypatch.setattr(triton, "lora_inputs", lambda weights_type: original("TYPE_FP16"))
    with pytest.raises(FtdError, match=r"declares lora_weights as TYPE_FP16 but the engine is bf16 \(TYPE_BF16\)"):
        make_bundle(built, target)
    monkeypatch.setattr(triton, "lora_inputs", original)
    _, path = make_bundle(built, trt_target("bf16"))
    stored = list((built["store"].root / "store" / "triton-bundle").glob("*/bundle.json"))
    assert stored and not any("mismatch probe" in p.read_text() for p in stored)
    edited = copy_bundle(path, tmp_path)
    config = edited / "model_repository/ensemble/config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_BF16", "TYPE_FP16"))
    with pytest.raises(FtdError, match="ensemble/config.pbtxt declares lora_weights as TYPE_FP16"):
        verify_bundle(edited)


def _edit_config_rows(bundle: Path, task_id: int, column: int, value: int) -> None:
    path = bundle / "model_repository/tensorrt_llm/warmup" / f"adapter_config_{task_id}.bin"
    rows = trt.read_raw(path, np.int32, 3).copy()
    rows[0, column] = value
    path.write_bytes(rows.astype("<i4").tobytes())


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda b: _edit_config_rows(b, 1, 2, 16), r"adapter wide: lora_config row 0 .*rank outside \(0, max_lora_rank=8\]; raise max_lora_rank"),
        (lambda b: _edit_config_rows(b, 2, 1, 99), r"adapter narrow: lora_config row 0 .*layer out of range \[0, 2\)"),
        (lambda b: _edit_config_rows(b, 2, 0, trt.MODULE_IDS["attn_qkv"]), r"adapter narrow: .*attn_qkv.*not built into the engine.*--lora_target_modules"),
        (lambda b: _truncate(b, "adapter_model_1.bin"), r"adapter_model_1.bin has \d+ bytes, dims need \d+"),
        (lambda b: _edit_manifest(b, lambda m: m["engine"]["lora_target_modules"].remove("mlp_gate")), r"adapter wide: .*mlp_gate.*not built into the engine"),
        (lambda b: _edit_warmup_type(b, "end_id", "TYPE_INT32", "TYPE_UINT32"), r"input end_id: data_type TYPE_UINT32 differs from the declared TYPE_INT32"),
        (lambda b: _scale_weights(b, 1, 1.5), r"adapter wide: ΔW differs from PEFT's"),
    ],
    ids=["rank-above-max", "layer-out-of-range", "module-not-built", "truncated-weights", "engine-lacks-module",
         "warmup-dtype-as-in-the-seed", "wrong-values"],
)  # fmt: skip
def test_what_the_runtime_would_reject_is_caught_on_cpu(built: dict, tmp_path: Path, breakage, message: str):
    _, path = make_bundle(built, trt_target("bf16"))
    broken = copy_bundle(path, tmp_path)
    breakage(broken)
    with pytest.raises(FtdError, match=message):
        verify_bundle(broken)


def _truncate(bundle: Path, name: str) -> None:
    path = bundle / "model_repository/tensorrt_llm/warmup" / name
    path.write_bytes(path.read_bytes()[:-64])


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    edit(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _edit_warmup_type(bundle: Path, key: str, old: str, new: str) -> None:
    path = bundle / "model_repository/tensorrt_llm/config.pbtxt"
    config = triton.parse(path.read_text())
    for warmup in config.model_warmup:
        assert triton.type_name(warmup.inputs[key].data_type) == old
        warmup.inputs[key].data_type = triton.schema().DataType.Value(new)
    path.write_text(triton.to_text(config))


def _scale_weights(bundle: Path, task_id: int, factor: float) -> None:
    path = bundle / "model_repository/tensorrt_llm/warmup" / f"adapter_model_{task_id}.bin"
    manifest = json.loads((bundle / "bundle.json").read_text())
    width = next(a["row_width"] for a in manifest["adapters"].values() if a["task_id"] == task_id)
    values = trt.read_raw(path, "bf16", width).astype(np.float32) * factor
    path.write_bytes(values.astype(trt.numpy_dtype("bf16")).tobytes())


def test_config_time_refusals():
    backend = get_backend("tensorrt_llm")
    adapters = [{"name": "wide", "modules": ["q_proj"], "max_rank": 8}]
    with pytest.raises(ConfigError, match=r"max_lora_rank: 4 is below adapter wide's rank 8"):
        backend.check_adapters(trt_target("bf16", max_lora_rank=4), adapters)
    with pytest.raises(ConfigError, match=r"adapters.wide: TensorRT-LLM LoRA cannot carry \['lm_head'\]"):
        backend.check_adapters(trt_target("bf16"), [{"name": "wide", "modules": ["lm_head"], "max_rank": 8}])
    with pytest.raises(ConfigError, match="max_loras: 1 < 2 adapters"):
        backend.check_adapters(trt_target("bf16", max_loras=1), adapters * 2)
    with pytest.raises(ConfigError, match="precision: 'int4' is not a TensorRT-LLM LoRA dtype"):
        backend.check(trt_target("int4"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="set `device: cuda`"):
        backend.check(trt_target("bf16").model_copy(update={"device": "cpu"}), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="not Phi3ForCausalLM"):
        backend.check(trt_target("fp16"), "Phi3ForCausalLM")
    with pytest.raises(ConfigError, match="lora_delivery: prefetch .* no bfloat16"):
        backend.check(trt_target("bf16", lora_delivery="prefetch"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match=r"options: unknown key `max_rank`"):
        backend.check(trt_target("bf16", max_rank=8), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="max_seq_len .* must exceed max_input_len"):
        backend.check(trt_target("bf16", max_input_len=512, max_seq_len=256), "LlamaForCausalLM")


def test_prefetch_layout_for_fp16(built: dict):
    _, path = make_bundle(built, trt_target("fp16", lora_delivery="prefetch"))
    engine = triton.parse((path / "model_repository/tensorrt_llm/config.pbtxt").read_text())
    assert engine.parameters["lora_prefetch_dir"].string_value == "/ftd-bundle/lora_prefetch"
    assert not engine.model_warmup
    for task_id in ("1", "2"):
        weights = np.load(path / "lora_prefetch" / task_id / "model.lora_weights.npy")
        assert weights.dtype == np.float16 and weights.ndim == 3 and weights.shape[0] == 1


def test_pre_and_postprocessing_models_round_trip_text(built: dict, monkeypatch):
    """The bundle's own Python-backend models, run against a minimal stand-in for Triton's utils module."""
    from google.protobuf import json_format
    from transformers import AutoTokenizer

    _, path = make_bundle(built, trt_target("bf16"))
    utils = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    utils.Tensor = Tensor
    utils.InferenceResponse = lambda output_tensors: {t.name: t.array for t in output_tensors}
    utils.get_input_tensor_by_name = lambda request, name: Tensor(name, request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)

    def load(name: str):
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            f"bundle_{name}", path / "model_repository" / name / "1" / "model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = triton.parse((path / "model_repository" / name / "config.pbtxt").read_text())
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                          "model_repository": str(path / "model_repository" / name)})  # fmt: skip
        return model

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    prompts = ["what is 2 plus 3", "12 + 30 ="]
    pre = load("preprocessing")
    [out] = pre.execute([{"QUERY": np.array([[p.encode()] for p in prompts], dtype=object),
                          "REQUEST_OUTPUT_LEN": np.array([[5], [5]], dtype=np.int32)}])  # fmt: skip
    for row, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert out["REQUEST_INPUT_LEN"][row, 0] == len(ids)
        assert out["INPUT_ID"][row, : len(ids)].tolist() == ids
    assert out["OUT_END_ID"].tolist() == [[tokenizer.eos_token_id]] * 2
    post = load("postprocessing")
    generated = [tokenizer.encode(" 5", add_special_tokens=False), tokenizer.encode(" 42", add_special_tokens=False)]
    width = max(map(len, generated)) + 2
    tokens = np.zeros((2, 1, width), dtype=np.int32)
    for row, ids in enumerate(generated):
        tokens[row, 0, : len(ids)] = ids
    [text] = post.execute([{"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": np.array([[len(g)] for g in generated])}])
    assert [t[0].decode() for t in text["OUTPUT"]] == [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
