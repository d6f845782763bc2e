"""The MLflow Models every servable version is: an OpenAI chat-completions interface
(`mlflow.pyfunc.ChatModel`) over the engine that passed its parity gate (`FtdChatModel`), or over
a PEFT adapter on its verified base model (`AdapterChatModel`).

MLflow loads them "from code" (`chat_model.py`, `adapter_model.py`: `mlflow.models.set_model`;
nothing is pickled) from the model's own folder, whose `artifacts/` hold the engine (or the
adapter), one tokenizer per adapter and `serving.json` (the target or the base model, each
adapter's stop tokens, the context length). `code/` holds the ftd source the version was
registered with, so what is served runs the code that was gated.

Decoding is greedy, as gated: sampling parameters (`temperature`, `top_p`, ...) are accepted by the
schema and ignored. A bundle of several adapters serves the one named in
`custom_inputs: {"adapter": NAME}`. Every bad request is an `MlflowException` with
INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`) whose message names the field.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import (
    ChatChoice,
    ChatChoiceDelta,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessage,
    ChatParams,
    TokenUsageStats,
)

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 64


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class FtdChatModel(ChatModel):
    def load_context(self, context) -> None:
        from ftd.config import TargetConfig
        from tasks.backends.registry import get_backend

        self._load_common(context)
        self.target = TargetConfig(**self.spec["target"])
        self.backend = get_backend(self.target.backend)

    def _load_common(self, context) -> None:
        from transformers import AutoTokenizer

        artifacts = {name: Path(path) for name, path in context.artifacts.items()}
        self.spec = json.loads(artifacts["serving"].read_text())
        self.engine_dir = artifacts["engine"]
        self.tokenizers = {
            name: AutoTokenizer.from_pretrained(artifacts["tokenizers"] / entry["tokenizer"])
            for name, entry in self.spec["adapters"].items()
        }
        self.engines: dict[str, object] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------ requests

    def _adapter(self, params: ChatParams) -> str:
        names = sorted(self.spec["adapters"])
        chosen = (params.custom_inputs or {}).get("adapter")
        if chosen is None:
            if len(names) == 1:
                return names[0]
            raise bad_request(f"custom_inputs.adapter: required: this bundle serves {', '.join(names)}")
        if chosen not in names:
            raise bad_request(
                f"custom_inputs.adapter: unknown adapter {chosen!r}; this model serves {', '.join(names)}"
            )
        return chosen

    def _prompt(self, messages: list[ChatMessage], params: ChatParams, adapter: str) -> tuple[list[int], int]:
        if not messages:
            raise bad_request("messages: at least one message is required")
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise bad_request(f"messages[{i}].role: {m.role!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m.content, str):
                raise bad_request(f"messages[{i}].content: expected text")
        if not messages[-1].content.strip():
            raise bad_request(f"messages[{len(messages) - 1}].content: the prompt is empty")
        max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise bad_request(f"max_tokens: expected a positive integer, got {max_tokens!r}")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        ids = list(self.tokenizers[adapter].apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
        limit = self.spec["context_length"]
        if len(ids) + max_tokens > limit:
            raise bad_request(
                f"messages: the prompt is {len(ids)} tokens and max_tokens {max_tokens}: together over the model's "
                f"context length {limit}; shorten the messages or lower max_tokens"
            )
        return ids, max_tokens

    def _engine(self, adapter: str):
        with self.lock:  # engines load once; bundle adapters share one loaded model
            if adapter not in self.engines:
                self.engines[adapter] = self._open(adapter)
            return self.engines[adapter]

    def _open(self, adapter: str):
        multi = self.target.mode == "multi_lora"
        return self.backend.open(self.engine_dir, self.target, adapter if multi else None)

    # ------------------------------------------------------------ ChatModel

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        adapter = self._adapter(params)
        ids, max_tokens = self._prompt(messages, params, adapter)
        eos = self.spec["adapters"][adapter]["eos"]
        generation = self._engine(adapter).greedy(ids, max_tokens, eos)
        tokens = generation.tokens
        text = self.tokenizers[adapter].decode(tokens, skip_special_tokens=True).strip()
        finish = "stop" if tokens and tokens[-1] in eos else "length"
        return ChatCompletionResponse(
            choices=[ChatChoice(message=ChatMessage(role="assistant", content=text), finish_reason=finish)],
            usage=TokenUsageStats(prompt_tokens=len(ids), completion_tokens=len(tokens),
                                  total_tokens=len(ids) + len(tokens)),
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}", model=self.spec["model"],
            custom_outputs={"adapter": adapter, "tokens": tokens},
        )  # fmt: skip

    def predict_stream(self, context, messages: list[ChatMessage], params: ChatParams) -> Iterator[ChatCompletionChunk]:
        """The answer as it is generated: one chunk per new piece of text (engines without a token
        stream send their whole answer in one chunk)."""
        adapter = self._adapter(params)
        ids, max_tokens = self._prompt(messages, params, adapter)
        eos, tokenizer, engine = self.spec["adapters"][adapter]["eos"], self.tokenizers[adapter], self._engine(adapter)
        stream = engine.stream(ids, max_tokens, eos) if hasattr(engine, "stream") else iter(
            engine.greedy(ids, max_tokens, eos).tokens)  # fmt: skip
        request_id, tokens, shown = f"chatcmpl-{uuid.uuid4().hex[:24]}", [], ""
        for token in stream:
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            if len(text) > len(shown):
                delta, shown = text[len(shown) :], text
                yield ChatCompletionChunk(choices=[ChatChunkChoice(delta=ChatChoiceDelta(content=delta))],
                                          id=request_id, model=self.spec["model"])  # fmt: skip
        finish = "stop" if tokens and tokens[-1] in eos else "length"
        yield ChatCompletionChunk(
            choices=[ChatChunkChoice(delta=ChatChoiceDelta(content=""), finish_reason=finish)], id=request_id,
            model=self.spec["model"], custom_outputs={"adapter": adapter, "tokens": tokens},
        )  # fmt: skip


class AdapterChatModel(FtdChatModel):
    """A registered PEFT adapter, answered by transformers + peft over its base model. Only the
    adapter's bytes are stored; the base is referenced (builtin recipe, local folder or hub id and
    revision) and its weights digest checked at load, so a different or missing base is an error,
    never a silent load on other weights (mlflow#23761)."""

    def load_context(self, context) -> None:
        self._load_common(context)
        corpus = context.artifacts.get("corpus")  # a builtin base's tokenizer corpus, stored with the model
        self.base_dir = verified_base(self.spec["base"], Path(corpus) if corpus else None)

    def _open(self, adapter: str):
        from peft import PeftModel

        from tasks.modeling import load_fp32_compute_model

        # the base in its stored dtype, computing in fp32: the gate's reference arithmetic, half the memory for bf16
        base = load_fp32_compute_model(self.base_dir, self.spec["base"]["trust_remote_code"])
        return TorchEngine(PeftModel.from_pretrained(base, self.engine_dir).eval(), self.tokenizers[adapter])


def verified_base(base: dict, corpus: Path | None = None) -> Path:
    """The base model's folder (rebuilt, found or downloaded), whose files' digest must equal the
    one recorded at registration."""
    from tasks.base_model import fetch, files_digest

    folder = fetch(base["source"], base.get("revision"), *([corpus] if corpus else []))
    found = files_digest(folder)
    if found != base["files_digest"]:
        raise MlflowException(
            f"base model {base['source']}: its files (digest {found[:12]}) differ from those the adapter was trained "
            f"on ({base['files_digest'][:12]}); refusing to serve the adapter on other weights"
        )
    return folder


class TorchEngine:
    """Greedy decoding with transformers (the gate's reference path)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]):
        from tasks.smoke import torch_greedy

        return torch_greedy(self.model, prompt_ids, max_new_tokens, eos_ids, self.tokenizer)
