"""Greedy decoding with onnxruntime-genai, shared by every og engine (merged or multi-LoRA)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tasks.backends.runtime import Generation


def og_tokens(og, model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], adapters=None,
              adapter: str | None = None) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Greedy decoding, one (token, logits) pair at a time: the gate keeps every step's logits, a
    served chat streams the tokens as they come."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    for _ in range(max_new_tokens):
        # get_logits() before generate_next_token(): afterwards it would already return
        # (and compute) the next position's logits.
        logits = np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1).copy()
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        yield token, logits
        if token in eos_ids:
            break


def og_greedy(og, model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], adapters=None,
              adapter: str | None = None) -> Generation:  # fmt: skip
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    for token, step in og_tokens(og, model, prompt_ids, max_new_tokens, eos_ids, adapters, adapter):
        tokens.append(token)
        logits.append(step)
    return Generation(tokens=tokens, logits=logits)


class OgEngine:
    def __init__(self, engine_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(engine_dir))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        return og_greedy(self.og, self.model, prompt_ids, max_new_tokens, eos_ids)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Iterator[int]:
        for token, _ in og_tokens(self.og, self.model, prompt_ids, max_new_tokens, eos_ids):
            yield token
