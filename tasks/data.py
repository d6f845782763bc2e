"""Read instruction data with `datasets` and write it in one normal form: conversational
prompt/completion rows, train and eval splits.

A source (`data.train`, `data.eval`) is what `datasets.load_dataset` accepts: a file or a glob of
files (JSON/JSONL, CSV, Parquet, Arrow), a local folder (`save_to_disk` output or data files) or a
hub dataset id with its `revision` and `split`. Rows stay in Arrow (memory-mapped) and are checked
and normalised batch by batch with `Dataset.map`, never held as one Python list.

`check_data` runs the same row checks on a sample (plus the schema), so pre-flight names the
first bad row and column before any compute starts.

The stage's key hashes the sources' bytes (local) or the pinned commit (hub), never their paths.
An unpinned hub dataset can move on the hub: like an unpinned hub model, it is keyed by the
content of what was loaded, and its run is never "up to date".

Given the base model, the stage also counts each row's tokens as training will (the chat template
over prompt + completion, with the base's tokenizer) and records, per split, the rows, tokens, the
longest row and how many rows exceed the adapter's `max_length`; `data.overlong` says what happens
to those train rows (warn: kept, training truncates them; truncate: the same, silently; drop).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftd.config import DataConfig, SftSettings
from ftd.errors import ConfigError
from ftd.store import (
    Artifact,
    Store,
    code_version,
    digest,
    file_digest,
    hash_memo,
    library_versions,
    memoised_file_digest,
    stage_key,
    tree_digest,
)
from tasks.base_model import HUB_ID, model_dir
from tasks.modeling import load_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

STAGE = "data"
ROLES = ("assistant", "system", "user")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}  # fmt: skip
# The file types `datasets` infers from a suffix, limited to the builders ftd reads.
SUFFIXES = {".json": ("json", {}), ".jsonl": ("json", {}), ".ndjson": ("json", {}), ".csv": ("csv", {}),
            ".tsv": ("csv", {"sep": "\t"}), ".parquet": ("parquet", {}), ".arrow": ("arrow", {})}  # fmt: skip
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PINNED = re.compile(r"^[0-9a-f]{40}$")
LARGE = 100_000  # rows from which normalising uses several processes
DEFAULT_MAX_LENGTH = SftSettings().max_length  # an imported adapter's, and a caller's that gives none
log = logging.getLogger("ftd.data")


@dataclass(frozen=True)
class Source:
    """One configured source, classified without reading it."""

    kind: str  # "files" | "saved" (save_to_disk) | "folder" (data files) | "hub"
    label: str  # as configured: names the source in errors
    split: str  # datasets' split spec, slicing included: train[:2000]
    field: str  # the config key that named it
    paths: tuple[str, ...] = ()  # files, or the one folder or hub id
    revision: str | None = None

    @property
    def split_name(self) -> str:
        return self.split.split("[", 1)[0].strip()

    @property
    def pinned(self) -> bool:
        return self.kind != "hub" or bool(self.revision and PINNED.match(self.revision))


# ---------------------------------------------------------------- sources


def parse_source(value: str, split: str, cfg: DataConfig, field: str) -> Source:
    """Classify a source like `parse_base` classifies a model: an existing path or glob is local,
    `owner/name` that is not one is a hub id; anything else is a missing file, named with its field."""
    if re.search(r"[*?\[]", value):
        files = sorted(p for p in glob.glob(os.path.expanduser(value), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"{field}: no file matches {value}")
        return Source("files", value, split, field, tuple(files))
    path = Path(value).expanduser()
    if path.is_file():
        return Source("files", value, split, field, (str(path),))
    if path.is_dir():
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        return Source("saved" if saved else "folder", value, split, field, (str(path),))
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") != 1 or _suffix(value) in SUFFIXES
    if looks_like_path or not HUB_ID.match(value):
        raise ConfigError(f"{field}: file not found: {value}")
    return Source("hub", value, split, field, (value,), cfg.revision)


def data_sources(cfg: DataConfig, field: str = "data") -> dict[str, Source]:
    """The train source and, when configured, the eval source."""
    sources = {"train": parse_source(cfg.train, cfg.split, cfg, f"{field}.train")}
    if cfg.eval is not None:
        sources["eval"] = parse_source(cfg.eval, cfg.eval_split, cfg, f"{field}.eval")
    if cfg.revision is not None and all(s.kind != "hub" for s in sources.values()):
        raise ConfigError(f"{field}.revision: only a hub dataset has a revision; {cfg.train} is local")
    return sources


def _suffix(name: str) -> str:
    """The data suffix, under a compression suffix (`x.jsonl.gz` is JSON, as datasets reads it)."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _builder(source: Source, cfg: DataConfig) -> tuple[str, dict]:
    if cfg.builder != "auto":
        return cfg.builder, {}
    found = {}
    for f in source.paths:
        if _suffix(f) not in SUFFIXES:
            raise ConfigError(
                f"{source.field}: cannot tell the file type of {f} from its suffix; set data.builder (json, csv, parquet or arrow)"
            )
        found[SUFFIXES[_suffix(f)][0]] = SUFFIXES[_suffix(f)]
    if len(found) > 1:
        raise ConfigError(f"{source.field}: {source.label} matches files of several types ({', '.join(sorted(found))})")
    return next(iter(found.values()))


# ---------------------------------------------------------------- reading


@contextmanager
def quiet() -> Iterator[None]:
    """Silence datasets' progress bars and log lines (`Using the latest cached version`, `Failed to
    load JSON`): ftd reports progress itself, and an input error must reach the user as one line.
    Also turns off datasets' download counter, a request to S3 on every load, local files included."""
    from datasets import config as ds_config
    from datasets import utils as ds_utils
    from datasets.utils import logging as ds_logging

    ds_config.HF_UPDATE_DOWNLOAD_COUNTS = False

    level, bars_off = ds_logging.get_verbosity(), ds_utils.are_progress_bars_disabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    ds_utils.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_off:
            ds_utils.enable_progress_bars()


def open_source(source: Source, cfg: DataConfig, streaming: bool, cache_dir: Path | None = None) -> Any:
    """The source's split as a `Dataset` (Arrow, memory-mapped) or, streaming, an `IterableDataset`
    (streamed splits are not sliced: the sample is from the split's start). Hub datasets use
    datasets' own cache; local files are prepared into `cache_dir`."""
    from datasets import load_dataset

    split = source.split_name if streaming else source.split
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        with quiet():
            if source.kind == "saved":
                return _saved_split(source)
            if source.kind == "hub":
                dataset = load_dataset(source.paths[0], revision=source.revision, split=split, streaming=streaming)
                _check_commit(dataset, source)
                return dataset
            if source.kind == "folder":
                if cfg.builder == "auto":
                    return load_dataset(source.paths[0], split=split, streaming=streaming, cache_dir=cache)
                return load_dataset(
                    cfg.builder, data_dir=source.paths[0], split=split, streaming=streaming, cache_dir=cache
                )
            builder, options = _builder(source, cfg)
            files = list(source.paths)
            return load_dataset(builder, data_files=files, split=split, streaming=streaming, cache_dir=cache, **options)
    except ConfigError:
        raise
    except Exception as exc:  # whatever datasets or pyarrow raise for a source they cannot read
        raise unreadable(source, exc) from None


def _saved_split(source: Source) -> Dataset:
    """A `save_to_disk` folder (one dataset or a dict of splits), sliced like load_dataset slices."""
    from datasets import DatasetDict, ReadInstruction, concatenate_datasets, load_from_disk

    saved = load_from_disk(source.paths[0])
    dataset = saved
    if isinstance(saved, DatasetDict):
        if source.split_name not in saved:
            raise ConfigError(
                f"{source.field}: {source.label} has no split {source.split_name!r} (splits: {', '.join(saved)})"
            )
        dataset = saved[source.split_name]
    if source.split == source.split_name:
        return dataset
    parts = ReadInstruction.from_spec(source.split).to_absolute({source.split_name: len(dataset)})
    return concatenate_datasets([dataset.select(range(p.from_, p.to)) for p in parts])


def _check_commit(dataset: Any, source: Source) -> None:
    """Offline, datasets loads the latest cached commit whatever the revision says: refuse a copy
    that is not the pinned one rather than train on other data under the pinned key."""
    if not (source.revision and PINNED.match(source.revision)):
        return
    for entry in getattr(dataset, "cache_files", None) or []:
        commits = [part for part in Path(entry["filename"]).parts if PINNED.match(part)]
        if commits and commits[-1] != source.revision:
            raise ConfigError(
                f"{source.field}: the copy of {source.label} that datasets loaded is at commit {commits[-1]}, "
                f"not the pinned revision {source.revision} (offline, only the latest cached commit is used)"
            )


def unreadable(source: Source, exc: BaseException) -> ConfigError:
    """One line for a source datasets could not read: for JSON lines, the file and line."""
    cause = exc.__cause__ if exc.__cause__ is not None and type(exc).__name__ == "DatasetGenerationError" else exc
    parse_error = type(cause).__name__ in ("ArrowInvalid", "JSONDecodeError")  # not e.g. an unknown split
    if parse_error and source.kind == "files" and all(_suffix(f) in (".jsonl", ".ndjson") for f in source.paths):
        for path in source.paths:
            bad = _first_bad_json_line(Path(path))
            if bad is not None:
                return ConfigError(f"{path}:{bad[0]}: not valid JSON ({bad[1]})")
    text = (str(cause).strip().splitlines() or [""])[0]
    return ConfigError(f"{source.field}: cannot read {source.label}: {type(cause).__name__}: {text}")


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    if path.suffix.lower() in COMPRESSION:
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return lineno, exc.msg
    return None


# ---------------------------------------------------------------- checking and normalising rows


def check_columns(columns: list[str], cfg: DataConfig, label: str) -> None:
    """The schema: every column the format needs is there."""
    missing = [c for c in cfg.columns if c not in columns]
    if missing:
        have = ", ".join(sorted(columns)) or "none"
        raise ConfigError(f"{label}: row 1 has no column {missing[0]!r} (columns: {have})")


def examples(row: dict, cfg: DataConfig, where: str) -> list[tuple[list[dict], str]]:
    """The (prompt messages, answer) pairs one source row trains on; ConfigError naming the row
    and column when it does not fit the format. `turns: all` gives one pair per assistant turn."""
    if cfg.format == "alpaca":
        messages = _alpaca(row, where)
    elif cfg.format == "prompt_response":
        prompt, response = cfg.columns
        messages = [{"role": "user", "content": _text(row, prompt, where)},
                    {"role": "assistant", "content": _text(row, response, where)}]  # fmt: skip
    else:
        messages = _conversation(row, cfg, where)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    last = len(messages) - 1
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"] if cfg.turns == "all" else [last]
    return [(messages[:i], messages[i]["content"]) for i in ends]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(row: dict, column: str, where: str) -> str:
    """A text cell; numbers (a CSV column of digits) are taken as their text, as before."""
    value = row.get(column)
    if value is None or isinstance(value, (list, dict, bool)):
        raise ConfigError(f"{where}, column {column!r}: expected text (got {_show(value)})")
    return str(value)


def _alpaca(row: dict, where: str) -> list[dict]:
    prompt = _text(row, "instruction", where)
    if row.get("input") not in (None, ""):
        prompt = f"{prompt}\n\n{_text(row, 'input', where)}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)}]


def _conversation(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    """messages ({role, content}) or sharegpt ({from, value}, role names mapped), ending with the
    assistant's answer."""
    column = cfg.columns[0]
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}, column {column!r}: expected a non-empty list of messages (got {_show(turns)})")
    sharegpt = cfg.format == "sharegpt"
    messages = []
    for k, turn in enumerate(turns, 1):
        turn = turn if isinstance(turn, dict) else {}
        role, content = (turn.get("from"), turn.get("value")) if sharegpt else (turn.get("role"), turn.get("content"))
        role = SHAREGPT_ROLES.get(str(role).lower()) if sharegpt else role
        if role not in ROLES or not isinstance(content, str):
            expected = (
                f"from in {sorted(SHAREGPT_ROLES)} and text value"
                if sharegpt
                else f"role in {list(ROLES)} and text content"
            )
            raise ConfigError(
                f"{where}, column {column!r}, message {k}: expected {expected} (got {_show(turns[k - 1])})"
            )
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}, column {column!r}: the last message must be the assistant's answer")
    return messages


def check_data(cfg: DataConfig, field: str, sample: int) -> None:
    """Pre-flight: each source can be read, has the format's columns, and its first `sample` rows
    fit the format (streamed: nothing is prepared or stored)."""
    for source in data_sources(cfg, field).values():
        rows, columns = _sample(source, cfg, sample)
        check_columns(columns, cfg, source.label)
        if not rows:
            raise ConfigError(f"{source.label}: no rows")
        for i, row in enumerate(rows):
            examples(row, cfg, f"{source.label}: row {i + 1}")


def _sample(source: Source, cfg: DataConfig, sample: int) -> tuple[list[dict], list[str]]:
    from datasets import IterableDataset

    dataset = open_source(source, cfg, streaming=source.kind != "saved")
    try:
        with quiet():
            if isinstance(dataset, IterableDataset):
                rows = list(islice(dataset, sample))
                return rows, list(dataset.column_names or (rows[0] if rows else []))
            return dataset.select(range(min(sample, len(dataset)))).to_list(), list(dataset.column_names)
    except Exception as exc:  # a streamed source fails while it is read
        raise unreadable(source, exc) from None


# Rows of the normal form: what sft.py, smoke.py and the backends read through `load_split`.
def _normal_features() -> Any:
    from datasets import Features, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({"prompt": [message], "completion": [message], "answer": Value("string")})


def _normalise_batch(batch: dict[str, list], indices: list[int], cfg: DataConfig, label: str,
                     rows: list[int] | None) -> dict[str, list]:  # fmt: skip
    """One batch of source rows to normal rows; `rows` maps a position in a shuffled split back to
    the source row an error must name."""
    out: dict[str, list] = {"prompt": [], "completion": [], "answer": []}
    for j, index in enumerate(indices):
        row = {name: values[j] for name, values in batch.items()}
        number = (rows[index] if rows is not None else index) + 1
        for prompt, answer in examples(row, cfg, f"{label}: row {number}"):
            out["prompt"].append(prompt)
            out["completion"].append([{"role": "assistant", "content": answer}])
            out["answer"].append(answer)
    return out


def _processes(rows: int) -> int | None:
    """Several processes from LARGE rows: below that, starting them costs more than they save."""
    return min(4, os.cpu_count() or 1) if rows >= LARGE else None


def _normalise(dataset: Dataset, cfg: DataConfig, label: str, rows: list[int] | None, name: str, work: Path) -> Dataset:
    """Check and normalise every row (several processes for large data), kept in Arrow."""
    check_columns(dataset.column_names, cfg, label)
    optional = ("input",) if cfg.format == "alpaca" and "input" in dataset.column_names else ()
    columns = [*cfg.columns, *optional]
    return dataset.select_columns(columns).map(
        _normalise_batch, batched=True, with_indices=True, remove_columns=columns,
        fn_kwargs={"cfg": cfg, "label": label, "rows": rows}, features=_normal_features(),
        num_proc=_processes(len(dataset)), cache_file_name=str(work / f"{name}.arrow"),
        new_fingerprint=digest(name, label, len(dataset)),
    )  # fmt: skip


def _write(normal: Dataset, out: Path) -> int:
    """The normal form as JSON lines (the `tokens` column is the stage's own, not the rows')."""
    if "tokens" in normal.column_names:
        normal = normal.remove_columns("tokens")
    normal.to_json(str(out), lines=True, num_proc=_processes(len(normal)))
    return len(normal)


# ---------------------------------------------------------------- token statistics


def _tokenizer(base: Artifact, cfg: DataConfig, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template training will use: counts made with any other would not be
    the lengths SFTTrainer truncates."""
    tokenizer = load_tokenizer(model_dir(base), trust_remote_code, cfg.chat_template)
    if not tokenizer.chat_template:
        raise ConfigError("data.chat_template: the base model's tokenizer has no chat template; set one")
    return tokenizer


def _token_batch(
    batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase, split: str
) -> dict[str, list]:
    """Each row's length as TRL's SFTTrainer tokenises a conversational prompt/completion row: the
    chat template applied to prompt + completion messages, tokenize=True."""
    conversations = [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
    try:
        ids = tokenizer.apply_chat_template(conversations, tokenize=True)
    except Exception:  # a template that refuses a row (raise_exception): find and name it
        for index, conversation in zip(indices, conversations, strict=True):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=True)
            except Exception as exc:
                text = (str(exc).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"data.chat_template: cannot apply it to {split} row {index + 1}: {type(exc).__name__}: {text}"
                ) from None
        raise
    return {"tokens": [len(row) for row in ids]}


def _count_tokens(normal: Dataset, tokenizer: PreTrainedTokenizerBase, name: str, work: Path) -> Dataset:
    """The normal rows with a `tokens` column (batched, several processes for large data)."""
    return normal.map(
        _token_batch, batched=True, with_indices=True, fn_kwargs={"tokenizer": tokenizer, "split": name},
        num_proc=_processes(len(normal)), cache_file_name=str(work / f"{name}-tokens.arrow"),
        new_fingerprint=digest(name, "tokens", normal._fingerprint),
    )  # fmt: skip


def _token_stats(counted: Dataset, max_length: int) -> dict[str, int]:
    """One split's figures, from its `tokens` column in Arrow (never a Python list of the rows)."""
    import pyarrow.compute as pc

    tokens = counted.data.column("tokens")
    return {"rows": len(counted), "tokens": pc.sum(tokens).as_py() or 0, "max_tokens": pc.max(tokens).as_py() or 0,
            "over_max_length": pc.sum(pc.greater(tokens, max_length)).as_py() or 0}  # fmt: skip


def _fits(tokens: list[int], max_length: int) -> list[bool]:
    return [n <= max_length for n in tokens]


def _drop_overlong(counted: Dataset, max_length: int, work: Path) -> Dataset:
    """The train rows no longer than max_length (`overlong: drop`)."""
    return counted.filter(
        _fits, input_columns="tokens", batched=True, fn_kwargs={"max_length": max_length},
        num_proc=_processes(len(counted)), cache_file_name=str(work / "train-kept.arrow"),
        new_fingerprint=digest("kept", max_length, counted._fingerprint),
    )  # fmt: skip


def _warn_overlong(stats: dict, max_length: int, label: str) -> None:
    train, evals = stats["train"], stats.get("eval", {})
    eval_over = evals.get("over_max_length", 0)
    evals_note = f"; {eval_over} of {evals['rows']} eval rows too" if eval_over else ""
    log.warning(
        "%s: %d of %d train rows are longer than max_length %d tokens (the longest: %d); training truncates them%s "
        "(data.overlong: truncate to keep them without this warning, drop to leave them out)",
        label, train["over_max_length"], train["rows"], max_length, train["max_tokens"], evals_note,
    )  # fmt: skip


# ---------------------------------------------------------------- the stage


def source_digest(source: Source) -> str | None:
    """What identifies a source's content without reading it through datasets: the bytes of its
    files (their order, not their names, for a glob), a folder's tree, or a hub id at a pinned
    commit; None for an unpinned hub dataset, whose content is known only once it is loaded."""
    if source.kind == "files":
        digests = [file_digest(Path(f)) for f in source.paths]
        return digests[0] if len(digests) == 1 else digest(digests, length=64)
    if source.kind in ("saved", "folder"):
        return tree_digest(Path(source.paths[0]), exclude={".cache", ".git"})
    return f"{source.label}@{source.revision}" if source.pinned else None


def _key(cfg: DataConfig, inputs: list[str], base: Artifact | None, max_length: int, trust_remote_code: bool) -> str:
    # Paths are not content: drop them from the hashed config section. The token statistics, and
    # the rows `overlong: drop` leaves out, follow the tokenizer (in the base's key), how it is
    # loaded (modeling.py, trust_remote_code, the libraries) and max_length.
    section = cfg.model_dump(mode="json", exclude={"train", "eval"}) | {
        "has_eval_file": cfg.eval is not None, "max_length": max_length, "trust_remote_code": trust_remote_code,
    }  # fmt: skip
    inputs = [*inputs, base.key] if base is not None else inputs
    libraries = library_versions("datasets", "pyarrow", "transformers", "tokenizers")
    code = code_version(__file__, Path(__file__).parent / "modeling.py")
    return stage_key(STAGE, code=code, config=section, inputs=inputs, libraries=libraries)


def data_key(cfg: DataConfig, base: Artifact | None = None, max_length: int = DEFAULT_MAX_LENGTH,
             trust_remote_code: bool = False) -> str | None:  # fmt: skip
    """The stage's key; None (not cached ahead of the stage) for an unpinned hub dataset."""
    inputs = [source_digest(s) for s in data_sources(cfg).values()]
    return None if None in inputs else _key(cfg, inputs, base, max_length, trust_remote_code)  # type: ignore[arg-type]


def _loaded_digest(dataset: Any, source: Source, store: Store) -> str:
    """An unpinned hub dataset's content: the Arrow files datasets prepared, memoised by their stat
    (like a local base model's weights), so an unchanged copy costs no rehash."""
    with hash_memo(store.root) as memo:
        entries = [memoised_file_digest(Path(entry["filename"]), memo) for entry in dataset.cache_files]
    if not entries:  # held in memory, no files to hash: key by its fingerprint (never a stale hit)
        entries.append(dataset._fingerprint)
    return f"{source.label}@content:{digest(entries, length=64)}"


def prepare_data(cfg: DataConfig, store: Store, base: Artifact | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 trust_remote_code: bool = False) -> Artifact:  # fmt: skip
    """train.jsonl and eval.jsonl in the normal form; every row checked on the way, an error
    naming the source row even after the shuffle that holds out `eval_fraction`.

    With the base model (its tokenizer and `data.chat_template`, as training uses them), each
    split's token statistics against the adapter's `max_length` are recorded and `data.overlong`
    applied to train; without it (callers that need only the rows), there are none."""
    sources = data_sources(cfg)
    cache_dir = store.root / "cache" / "datasets"
    loaded: dict[str, Any] = {}
    key = data_key(cfg, base, max_length, trust_remote_code)
    if key is None:  # an unpinned hub source: load it first, its content is the key
        inputs = []
        for name, source in sources.items():
            if not source.pinned:
                loaded[name] = open_source(source, cfg, streaming=False, cache_dir=cache_dir)
            inputs.append(source_digest(source) or _loaded_digest(loaded[name], source, store))
        key = _key(cfg, inputs, base, max_length, trust_remote_code)

    def load(name: str) -> Dataset:
        return loaded[name] if name in loaded else open_source(sources[name], cfg, streaming=False, cache_dir=cache_dir)

    def build(tmp: Path) -> dict:
        tokenizer = _tokenizer(base, cfg, trust_remote_code) if base is not None else None
        with quiet():
            meta = _write_splits(_splits(cfg, sources, load), cfg, tmp, tokenizer, max_length)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        return meta

    return store.materialize(STAGE, key, build, lineage={"base": base.key} if base is not None else None)


Splits = dict[str, tuple["Dataset", str, "list[int] | None"]]  # name: (rows, source label, source row numbers)


def _splits(cfg: DataConfig, sources: dict[str, Source], load: Callable[[str], Dataset]) -> Splits:
    """Train and eval as read: the eval source, or `eval_fraction` of train held out."""
    train, label = load("train"), sources["train"].label
    if len(train) == 0:
        raise ConfigError(f"{label}: no rows")
    if "eval" in sources:
        return {"train": (train, label, None), "eval": (load("eval"), sources["eval"].label, None)}
    # the same shuffle as ever: a permutation of row numbers, the rows stay in Arrow
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, int(len(order) * cfg.eval_fraction))
    return {"train": (train.select(order[n_eval:]), label, order[n_eval:]),
            "eval": (train.select(order[:n_eval]), label, order[:n_eval])}  # fmt: skip


def _write_splits(
    splits: Splits, cfg: DataConfig, tmp: Path, tokenizer: PreTrainedTokenizerBase | None, max_length: int
) -> dict:
    """Normalise, count tokens (with a tokenizer), apply `overlong`, write; the stage's meta."""
    work = tmp / ".work"
    normal = {name: _normalise(ds, cfg, label, rows, name, work) for name, (ds, label, rows) in splits.items()}
    meta: dict[str, Any] = {"source_rows": {name: len(ds) for name, (ds, _, _) in splits.items()}}
    if tokenizer is not None:
        normal = {name: _count_tokens(rows, tokenizer, name, work) for name, rows in normal.items()}
        normal["train"], meta["tokens"] = _apply_overlong(normal, cfg, max_length, splits["train"][1], work)
    meta |= {f"{name}_rows": _write(rows, tmp / f"{name}.jsonl") for name, rows in normal.items()}
    return meta


def _apply_overlong(counted: dict[str, Dataset], cfg: DataConfig, max_length: int, label: str,
                    work: Path) -> tuple[Dataset, dict]:  # fmt: skip
    """The train rows to write under `data.overlong`, and the statistics the meta records: per
    split as read (rows, tokens, the longest, how many exceed max_length), then what was dropped.
    Eval rows are never dropped: the smoke test's prompts are not trained on."""
    stats = {name: _token_stats(rows, max_length) for name, rows in counted.items()}
    train, over = counted["train"], stats["train"]["over_max_length"]
    if over and cfg.overlong == "drop":
        train = _drop_overlong(train, max_length, work)
        if len(train) == 0:
            raise ConfigError(
                f"data.overlong: drop leaves no train rows: all {over} are longer than max_length {max_length} tokens"
            )
    elif over and cfg.overlong == "warn":
        _warn_overlong(stats, max_length, label)
    dropped = over if cfg.overlong == "drop" else 0
    return train, {"max_length": max_length, "overlong": cfg.overlong, "dropped": dropped, **stats}


def load_split(data: Artifact, store: Store, split: str) -> list[dict]:
    with open(data.path(store) / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]
