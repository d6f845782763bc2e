"""Read instruction data (JSONL, CSV or Parquet; chat messages or prompt/response columns) and
write it in one normal form: conversational prompt/completion rows, train and eval splits.

`read_rows` and `check_layout` are also what the pre-flight check uses, so a missing file or
column is reported before any compute starts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ftd.config import DataConfig
from ftd.errors import ConfigError
from ftd.store import Artifact, Store, code_version, file_digest, stage_key

STAGE = "data"
ROLES = {"system", "user", "assistant"}


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    for name, suffixes in {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "parquet": (".parquet",)}.items():
        if suffix in suffixes:
            return name
    raise ConfigError(f"data: cannot tell the format of {path} from its suffix; set data.format")


def read_rows(path: Path, fmt: str, field: str, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        rows = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if limit and len(rows) >= limit:
                    break
        return rows
    import pandas as pd

    frame = pd.read_csv(path, nrows=limit) if fmt == "csv" else pd.read_parquet(path)
    return frame.head(limit).to_dict("records") if limit else frame.to_dict("records")


def check_layout(rows: list[dict], cfg: DataConfig, path: Path) -> None:
    """Every row has the configured columns, and chat rows end with an assistant turn."""
    if not rows:
        raise ConfigError(f"{path}: no rows")
    columns = [cfg.messages_field] if cfg.uses_messages else [cfg.prompt_field, cfg.response_field]
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise ConfigError(f"{path}: row {i + 1} has no column {missing[0]!r} (columns: {have})")
        if cfg.uses_messages:
            messages = row[cfg.messages_field]
            if not isinstance(messages, list) or not messages:
                raise ConfigError(f"{path}: row {i + 1}: {cfg.messages_field!r} must be a non-empty list of messages")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ConfigError(
                        f"{path}: row {i + 1}: each message needs role in {sorted(ROLES)} and text content"
                    )
            if messages[-1]["role"] != "assistant":
                raise ConfigError(f"{path}: row {i + 1}: the last message must be the assistant's answer")


def to_prompt_completion(row: dict, cfg: DataConfig) -> dict:
    if cfg.uses_messages:
        messages = list(row[cfg.messages_field])
    else:
        messages = [
            {"role": "user", "content": str(row[cfg.prompt_field])},
            {"role": "assistant", "content": str(row[cfg.response_field])},
        ]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    answer = messages[-1]["content"]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "answer": answer}


def data_key(cfg: DataConfig) -> str:
    files = [file_digest(cfg.train)] + ([file_digest(cfg.eval)] if cfg.eval else [])
    # Paths are not content: drop them from the hashed config section.
    section = cfg.model_dump(mode="json", exclude={"train", "eval"}) | {"has_eval_file": cfg.eval is not None}
    return stage_key(STAGE, code=code_version(__file__), config=section, inputs=files, libraries={})


def prepare_data(cfg: DataConfig, store: Store) -> Artifact:
    def build(tmp: Path) -> dict:
        train_rows = read_rows(cfg.train, cfg.format, "data.train")
        check_layout(train_rows, cfg, cfg.train)
        if cfg.eval:
            eval_rows = read_rows(cfg.eval, cfg.format, "data.eval")
            check_layout(eval_rows, cfg, cfg.eval)
        else:
            shuffled = train_rows[:]
            random.Random(cfg.seed).shuffle(shuffled)
            n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
            eval_rows, train_rows = shuffled[:n_eval], shuffled[n_eval:]
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            with open(tmp / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(to_prompt_completion(row, cfg)) + "\n")
        return {"train_rows": len(train_rows), "eval_rows": len(eval_rows)}

    return store.materialize(STAGE, data_key(cfg), build)


def load_split(data: Artifact, store: Store, split: str) -> list[dict]:
    with open(data.path(store) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]
