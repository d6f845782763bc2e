"""What an opened engine gives the smoke test: greedy tokens and, where the engine exposes them,
the logits of every generated step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Generation:
    tokens: list[int]
    logits: list[np.ndarray] | None  # one vector per generated step, when the engine exposes them


class Engine(Protocol):
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation: ...
