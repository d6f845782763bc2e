"""Triton model configs for the TensorRT-LLM inflight-batcher layout, built as protobuf messages.

Every `config.pbtxt` is made as an `inference.ModelConfig` message (Triton's own schema, shipped in
the `tritonclient` wheel) and printed with protobuf's text format, so a misspelt field or a wrong
enum cannot be written; the checks parse the files back with the same schema.

The four models (names and wiring follow tensorrtllm_backend's `all_models/inflight_batcher_llm`):
`ensemble` (text in, text out) → `preprocessing` (tokenize) → `tensorrt_llm` (the engine) →
`postprocessing` (detokenize). The LoRA inputs are declared in the engine's dtype in both
`ensemble` and `tensorrt_llm` — the stock configs say TYPE_FP16 whatever the engine is, and a bf16
engine then rejects or ignores the adapter (tensorrtllm_backend #791).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

ENSEMBLE, PRE, POST, ENGINE = "ensemble", "preprocessing", "postprocessing", "tensorrt_llm"
MODELS = (ENSEMBLE, PRE, POST, ENGINE)


@functools.cache
def schema():
    """Triton's generated `model_config_pb2` module.

    Loaded from its file: importing `tritonclient.grpc` would also import grpcio, which this
    project does not need (and whose protobuf pin conflicts with onnx/mlflow)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tritonclient package is needed to write Triton configs (pip install tritonclient)")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("ftd_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def to_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse(text: str, source: str = "config.pbtxt"):
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, schema().ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{source}: not a valid Triton model config: {exc}") from None


def type_name(enum_value: int) -> str:
    return schema().DataType.Name(enum_value)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "TYPE_INT32", ...
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class WarmupInput:
    dtype: str
    dims: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class Warmup:
    name: str
    inputs: dict[str, WarmupInput]


def model_config(
    name: str, *, inputs: list[Tensor], outputs: list[Tensor], max_batch_size: int, backend: str | None = None,
    platform: str | None = None, parameters: dict[str, str] | None = None, decoupled: bool | None = None,
    warmups: list[Warmup] = (), steps: list[dict] | None = None, instance_kind: str | None = None,
):  # fmt: skip
    pb = schema()
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend:
        config.backend = backend
    if platform:
        config.platform = platform
    for tensor in inputs:
        entry = config.input.add(name=tensor.name, data_type=pb.DataType.Value(tensor.dtype), dims=list(tensor.dims))
        entry.optional = tensor.optional
        entry.allow_ragged_batch = tensor.ragged
        if tensor.reshape is not None:
            entry.reshape.shape.extend(tensor.reshape)
            entry.reshape.SetInParent()
    for tensor in outputs:
        config.output.add(name=tensor.name, data_type=pb.DataType.Value(tensor.dtype), dims=list(tensor.dims))
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    if decoupled is not None:
        config.model_transaction_policy.decoupled = decoupled
    if steps is not None:
        for step in steps:
            s = config.ensemble_scheduling.step.add(model_name=step["model"], model_version=-1)
            s.input_map.update(step["inputs"])
            s.output_map.update(step["outputs"])
    elif platform != "ensemble":
        config.dynamic_batching.SetInParent()
    if instance_kind:
        config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.Kind.Value(instance_kind))
    for warmup in warmups:
        w = config.model_warmup.add(name=warmup.name, batch_size=1)
        for key, item in warmup.inputs.items():
            w.inputs[key].data_type = pb.DataType.Value(item.dtype)
            w.inputs[key].dims.extend(item.dims)
            w.inputs[key].input_data_file = item.file
    return config


# ---------------------------------------------------------------- the four models


def lora_inputs(weights_type: str) -> list[Tensor]:
    return [
        Tensor("lora_task_id", "TYPE_UINT64", (1,), optional=True),
        Tensor("lora_weights", weights_type, (-1, -1), optional=True, ragged=True),
        Tensor("lora_config", "TYPE_INT32", (-1, 3), optional=True, ragged=True),
    ]


def ensemble_config(max_batch_size: int, weights_type: str | None):
    lora = lora_inputs(weights_type) if weights_type else []
    engine_inputs = {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
                     "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_END_ID", "pad_id": "_PAD_ID"}  # fmt: skip
    engine_inputs.update({t.name: t.name for t in lora})
    steps = [
        {"model": PRE, "inputs": {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens"},
         "outputs": {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
                     "OUT_REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "OUT_END_ID": "_END_ID", "OUT_PAD_ID": "_PAD_ID"}},
        {"model": ENGINE, "inputs": engine_inputs,
         "outputs": {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}},
        {"model": POST, "inputs": {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
         "outputs": {"OUTPUT": "text_output"}},
    ]  # fmt: skip
    return model_config(
        ENSEMBLE,
        platform="ensemble",
        max_batch_size=max_batch_size,
        inputs=[Tensor("text_input", "TYPE_STRING", (1,)), Tensor("max_tokens", "TYPE_INT32", (1,)), *lora],
        outputs=[Tensor("text_output", "TYPE_STRING", (-1,))],
        steps=steps,
    )


def preprocessing_config(max_batch_size: int, end_id: int, pad_id: int):
    return model_config(
        PRE,
        backend="python",
        max_batch_size=max_batch_size,
        inputs=[Tensor("QUERY", "TYPE_STRING", (1,)), Tensor("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,))],
        outputs=[
            Tensor("INPUT_ID", "TYPE_INT32", (-1,)),
            Tensor("REQUEST_INPUT_LEN", "TYPE_INT32", (1,)),
            Tensor("OUT_REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,)),
            Tensor("OUT_END_ID", "TYPE_INT32", (1,)),
            Tensor("OUT_PAD_ID", "TYPE_INT32", (1,)),
        ],
        parameters={
            "tokenizer_dir": "../../tokenizer",
            "add_special_tokens": "false",
            "end_id": end_id,
            "pad_id": pad_id,
        },  # fmt: skip
        instance_kind="KIND_CPU",
    )


def postprocessing_config(max_batch_size: int):
    return model_config(
        POST,
        backend="python",
        max_batch_size=max_batch_size,
        inputs=[Tensor("TOKENS_BATCH", "TYPE_INT32", (-1, -1)), Tensor("SEQUENCE_LENGTH", "TYPE_INT32", (-1,))],
        outputs=[Tensor("OUTPUT", "TYPE_STRING", (-1,))],
        parameters={"tokenizer_dir": "../../tokenizer", "skip_special_tokens": "true"},
        instance_kind="KIND_CPU",
    )


def engine_config(
    max_batch_size: int, weights_type: str | None, parameters: dict[str, str], warmups: list[Warmup]
):  # fmt: skip
    scalar = {"reshape": ()}
    inputs = [
        Tensor("input_ids", "TYPE_INT32", (-1,), optional=True, ragged=True),
        Tensor("input_lengths", "TYPE_INT32", (1,), **scalar),
        Tensor("request_output_len", "TYPE_INT32", (1,), **scalar),
        Tensor("end_id", "TYPE_INT32", (1,), optional=True, **scalar),
        Tensor("pad_id", "TYPE_INT32", (1,), optional=True, **scalar),
        Tensor("beam_width", "TYPE_INT32", (1,), optional=True, **scalar),
    ]
    if weights_type:
        task, weights, config = lora_inputs(weights_type)
        inputs += [Tensor(task.name, task.dtype, task.dims, optional=True, reshape=()), weights, config]
    return model_config(
        ENGINE,
        backend="tensorrtllm",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=[Tensor("output_ids", "TYPE_INT32", (-1, -1)), Tensor("sequence_length", "TYPE_INT32", (-1,))],
        parameters=parameters,
        decoupled=False,
        warmups=warmups,
        instance_kind="KIND_CPU",  # the C++ backend places the engine on the GPU itself
    )
