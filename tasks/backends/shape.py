"""A base model's shape as engines see it, read from its config alone (pre-flight: nothing loaded).

Each backend's `check_model` refuses the shapes its kernels cannot run, naming the limit as the
engine's own source states it (docs/backends.md lists them with their sources); a shape refused
here would otherwise fail after training, in the engine's build or in the smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftd.config import TargetConfig
from ftd.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float | None
    rope_scaling: dict | None

    @classmethod
    def of(cls, config: dict) -> ModelShape | None:
        """None for a config without the sizes every decoder has (nothing to check against)."""
        if not config.get("hidden_size") or not config.get("num_attention_heads"):
            return None
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rotary_dim=int(head_dim * float(config.get("partial_rotary_factor") or 1.0)),
            rope_theta=config.get("rope_theta"),
            rope_scaling=config.get("rope_scaling") or None,
        )

    @property
    def rope_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")


def refuse(target: TargetConfig, engine: str, limit: str, found: str) -> ConfigError:
    """`targets.NAME: ENGINE LIMIT; this base model FOUND` — one line a user can act on."""
    return ConfigError(f"targets.{target.name}: {engine} {limit}; this base model {found}")


def check_grouped_heads(target: TargetConfig, engine: str, shape: ModelShape) -> None:
    """Every attention kernel here shares one K/V head among a whole number of query heads."""
    if shape.heads % shape.kv_heads:
        raise refuse(target, engine, "needs num_attention_heads to be a multiple of num_key_value_heads",
                     f"has {shape.heads} and {shape.kv_heads}")  # fmt: skip
