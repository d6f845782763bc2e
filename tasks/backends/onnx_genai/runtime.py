"""Greedy decoding with onnxruntime-genai, shared by every og engine (merged or multi-LoRA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.backends.runtime import Generation


def og_greedy(og, model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], adapters=None,
              adapter: str | None = None) -> Generation:  # fmt: skip
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    for _ in range(max_new_tokens):
        # get_logits() before generate_next_token(): afterwards it would already return
        # (and compute) the next position's logits.
        logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1).copy())
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        if token in eos_ids:
            break
    return Generation(tokens=tokens, logits=logits)


class OgEngine:
    def __init__(self, engine_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(engine_dir))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        return og_greedy(self.og, self.model, prompt_ids, max_new_tokens, eos_ids)
