"""Triton Python-backend model `preprocessing`: text → token ids with the experiment's tokenizer.

Copied by ftd into `model_repository/preprocessing/1/model.py`. Runs inside the Triton container,
which provides `triton_python_backend_utils` and `transformers`.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def resolve(path: str, args: dict) -> Path:
    """`tokenizer_dir` may be relative to this model's directory, so the bundle can live anywhere."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else Path(args["model_repository"]) / candidate


def encode_batch(tokenizer, queries: list[str], add_special_tokens: bool, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest query, and each query's true length."""
    ids = [tokenizer.encode(q, add_special_tokens=add_special_tokens) for q in queries]
    width = max(1, *(len(i) for i in ids))
    batch = np.full((len(ids), width), pad_id, dtype=np.int32)
    for row, tokens in enumerate(ids):
        batch[row, : len(tokens)] = tokens
    return batch, np.array([[len(i)] for i in ids], dtype=np.int32)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve(params["tokenizer_dir"], args)))
        self.add_special_tokens = params.get("add_special_tokens", "false").lower() == "true"
        self.end_id = int(params["end_id"])
        self.pad_id = int(params["pad_id"])

    def execute(self, requests):
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy()
            output_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy()
            texts = [q[0].decode("utf-8") if isinstance(q[0], bytes) else str(q[0]) for q in query]
            ids, lengths = encode_batch(self.tokenizer, texts, self.add_special_tokens, self.pad_id)
            batch = len(texts)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("INPUT_ID", ids),
                        pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
                        pb_utils.Tensor("OUT_REQUEST_OUTPUT_LEN", output_len.astype(np.int32).reshape(batch, 1)),
                        pb_utils.Tensor("OUT_END_ID", np.full((batch, 1), self.end_id, dtype=np.int32)),
                        pb_utils.Tensor("OUT_PAD_ID", np.full((batch, 1), self.pad_id, dtype=np.int32)),
                    ]
                )
            )
        return responses
