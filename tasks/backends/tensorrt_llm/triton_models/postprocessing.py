"""Triton Python-backend model `postprocessing`: generated token ids → text.

Copied by ftd into `model_repository/postprocessing/1/model.py`. The engine is configured with
`exclude_input_in_output`, so `TOKENS_BATCH` holds only generated tokens: `[batch, beams, tokens]`
with each beam's length in `SEQUENCE_LENGTH` `[batch, beams]`.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def decode_batch(tokenizer, tokens: np.ndarray, lengths: np.ndarray, skip_special_tokens: bool) -> np.ndarray:
    texts = [
        [tokenizer.decode(beam[: int(n)].tolist(), skip_special_tokens=skip_special_tokens) for beam, n in zip(b, ln)]
        for b, ln in zip(tokens, lengths)
    ]
    return np.array([[t.encode("utf-8") for t in beams] for beams in texts], dtype=object)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        directory = Path(params["tokenizer_dir"])
        if not directory.is_absolute():
            directory = Path(args["model_repository"]) / directory
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.skip_special_tokens = params.get("skip_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            text = decode_batch(self.tokenizer, tokens, lengths, self.skip_special_tokens)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
