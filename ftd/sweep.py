"""Sweep specs: a base experiment config plus a grid or a list of overrides, one flow run per point.

    base: configs/tiny-llama.yaml
    grid:                                  # cartesian product; or `points:` a list of mappings
      adapters.0.lora.r: [4, 8]
      adapters.0.sft.learning_rate: [2.0e-3, 5.0e-3]
    overrides: ["smoke.max_prompts=32"]    # applied to every point
    objective: {metric: numbers.eval_accuracy_after, mode: max}
    promote: {alias: champion}             # set on the best point's versions, only if its gates passed

Every point is validated (schema and pre-flight) before the first one starts.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftd.config import NAME_PATTERN, ExperimentConfig, describe_validation_error, load_config
from ftd.errors import ConfigError


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(..., description="A key of the run summary's metrics, e.g. numbers.eval_accuracy_after.")
    mode: Literal["max", "min"] = "max"


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=NAME_PATTERN)
    base: Path
    grid: dict[str, list[Any]] | None = None
    points: list[dict[str, Any]] | None = None
    overrides: list[str] = Field(default_factory=list)
    objective: Objective
    promote: Promotion | None = Promotion()
    concurrency: int = Field(1, ge=1, description="Points run at once, in threads (their SFT steps take turns).")

    @model_validator(mode="after")
    def _one_way(self) -> SweepConfig:
        if (self.grid is None) == (self.points is None):
            raise ValueError("give exactly one of `grid` (a cartesian product) or `points` (a list)")
        if self.grid is not None and any(not values for values in self.grid.values()):
            raise ValueError("every grid key needs at least one value")
        return self

    def expand(self) -> list[dict[str, Any]]:
        """Each point as {config key path: value}."""
        if self.points is not None:
            return [dict(p) for p in self.points]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in point.items()]  # fmt: skip


def load_sweep(path: str | Path) -> tuple[SweepConfig, list[list[str]], list[ExperimentConfig]]:
    """The sweep and, per point, its full override list and validated config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
        sweep = SweepConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    runs, configs = [], []
    for i, point in enumerate(sweep.expand()):
        overrides = [*sweep.overrides, *point_overrides(point)]
        try:
            configs.append(load_config(sweep.base, overrides))
        except ConfigError as exc:
            raise ConfigError(f"{path}: point {i} ({', '.join(point_overrides(point))}): {exc}") from None
        runs.append(overrides)
    if not runs:
        raise ConfigError(f"{path}: the sweep has no points")
    return sweep, runs, configs
