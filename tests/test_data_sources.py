"""Data sources and formats (issue #26): every source kind `datasets` reads (JSONL, CSV, a Parquet
glob, Arrow, a `save_to_disk` folder, a data folder, a hub id from an offline cache) in every
instruction format (messages, alpaca, sharegpt with last/all turns, prompt_response), written in
the one normal form `load_split` returns; bad rows named by row and column, at pre-flight and in
the stage; keys from content, never from paths. Nothing here reaches the network."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest

from ftd.config import DataConfig
from ftd.errors import ConfigError
from ftd.store import Artifact, Store
from tasks import data as data_stage
from tasks.data import check_data, data_key, load_split, prepare_data

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch) -> None:
    """No connection leaves the process (datasets' download counter would try, and swallow the
    error: so attempts are recorded and must be none); datasets' own cache is private to the test."""
    import datasets.config

    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if isinstance(address, tuple):  # inet; unix sockets (multiprocessing) are local
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    yield
    assert attempts == [], f"tried to reach {attempts}"


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def _normal(prompt: list[dict], answer: str) -> dict:
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "answer": answer}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(tmp_path: Path, **data) -> tuple[list[dict], list[dict], dict]:
    cfg = DataConfig.model_validate(data)
    check_data(cfg, "data", 200)  # pre-flight accepts what the stage then reads
    store = Store(tmp_path / "artifacts")
    artifact = prepare_data(cfg, store)
    return load_split(artifact, store, "train"), load_split(artifact, store, "eval"), artifact.meta


# ---------------------------------------------------------------- formats


def test_messages_jsonl_gives_the_normal_form(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"messages": _messages(i), "extra": i} for i in range(5)])
    evals = _write_jsonl(tmp_path / "eval.jsonl", [{"messages": _messages(9)}])
    rows, eval_rows, meta = _prepare(tmp_path, train=str(train), eval=str(evals), system_prompt="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert rows == [_normal([system, _messages(i)[0]], f"answer {i}") for i in range(5)]
    assert eval_rows == [_normal([system, _messages(9)[0]], "answer 9")]
    assert (meta["train_rows"], meta["eval_rows"]) == (5, 1)


def test_alpaca_with_and_without_input(tmp_path: Path) -> None:
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Name a colour", "output": "red"}]  # fmt: skip
    train = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out, _, _ = _prepare(tmp_path, train=str(train), eval=str(train), eval_split="train[:1]", format="alpaca")
    assert out == [_normal([{"role": "user", "content": "Add\n\n2 and 3"}], "5"),
                   _normal([{"role": "user", "content": "Say hi"}], "hi"),
                   _normal([{"role": "user", "content": "Name a colour"}], "red")]  # fmt: skip


SHAREGPT = {"conversations": [{"from": "system", "value": "You count."}, {"from": "human", "value": "one?"},
                              {"from": "gpt", "value": "1"}, {"from": "user", "value": "two?"},
                              {"from": "chatgpt", "value": "2"}]}  # fmt: skip
SYSTEM, ONE, ANSWER_ONE, TWO = ({"role": "system", "content": "You count."}, {"role": "user", "content": "one?"},
                                {"role": "assistant", "content": "1"}, {"role": "user", "content": "two?"})  # fmt: skip


@pytest.mark.parametrize(
    ("turns", "expected"),
    [("last", [_normal([SYSTEM, ONE, ANSWER_ONE, TWO], "2")]),
     ("all", [_normal([SYSTEM, ONE], "1"), _normal([SYSTEM, ONE, ANSWER_ONE, TWO], "2")])],
)  # fmt: skip
def test_sharegpt_multi_turn_trains_on_the_last_or_every_assistant_turn(tmp_path: Path, turns, expected) -> None:
    train = _write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT])
    rows, eval_rows, _ = _prepare(tmp_path, train=str(train), eval=str(train), eval_split="train[:1]",
                                  format="sharegpt", turns=turns)  # fmt: skip
    assert rows == expected and eval_rows == expected


def test_messages_with_all_turns(tmp_path: Path) -> None:
    conversation = [*_messages(1), {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]
    train = _write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation}])
    rows, _, _ = _prepare(tmp_path, train=str(train), eval=str(train), eval_split="train[:1]", turns="all")
    assert rows == [_normal(conversation[:1], "answer 1"), _normal(conversation[:3], "done")]


def test_prompt_response_csv_with_its_field_names(tmp_path: Path) -> None:
    train = tmp_path / "qa.csv"
    train.write_text("q,a,note\nWhat is 2+2?,4,x\nCapital of France?,Paris,y\n")
    rows, _, _ = _prepare(tmp_path, train=str(train), eval=str(train), eval_split="train[1:]",
                          prompt_field="q", response_field="a")  # fmt: skip
    assert rows == [_normal([{"role": "user", "content": "What is 2+2?"}], "4"),
                    _normal([{"role": "user", "content": "Capital of France?"}], "Paris")]  # fmt: skip


# ---------------------------------------------------------------- source kinds


def _dataset(n: int):
    from datasets import Dataset

    return Dataset.from_list([{"messages": _messages(i)} for i in range(n)])


EXPECTED = [_normal(_messages(i)[:1], f"answer {i}") for i in range(6)]


def test_a_parquet_glob_reads_its_files_in_order(tmp_path: Path) -> None:
    dataset = _dataset(6)
    (tmp_path / "shards").mkdir()
    dataset.select(range(3)).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    dataset.select(range(3, 6)).to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    rows, _, _ = _prepare(
        tmp_path, train=str(tmp_path / "shards" / "*.parquet"), eval=str(tmp_path / "shards" / "part-1.parquet")
    )
    assert rows == EXPECTED


def test_an_arrow_file(tmp_path: Path) -> None:
    from datasets.arrow_writer import ArrowWriter

    dataset = _dataset(6)
    with ArrowWriter(path=str(tmp_path / "rows.arrow"), features=dataset.features) as writer:
        writer.write_table(dataset.data.table)
        writer.finalize()
    rows, _, _ = _prepare(
        tmp_path, train=str(tmp_path / "rows.arrow"), eval=str(tmp_path / "rows.arrow"), eval_split="train[:1]"
    )
    assert rows == EXPECTED


def test_a_save_to_disk_folder_with_splits_and_a_slice(tmp_path: Path) -> None:
    from datasets import DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": _dataset(6), "test": _dataset(2)}).save_to_disk(str(saved))
    before = data_stage.source_digest(data_stage.parse_source(str(saved), "train", DataConfig(train="x"), "data.train"))
    rows, eval_rows, _ = _prepare(tmp_path, train=str(saved), split="train[:4]", eval=str(saved), eval_split="test")
    assert rows == EXPECTED[:4] and eval_rows == EXPECTED[:2]
    # Nothing was written into the user's folder (no map cache files beside its Arrow files).
    after = data_stage.source_digest(data_stage.parse_source(str(saved), "train", DataConfig(train="x"), "data.train"))
    assert before == after


def test_a_data_folder_with_an_explicit_builder(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    _write_jsonl(folder / "train.txt", [{"messages": _messages(i)} for i in range(6)])  # suffix says nothing
    rows, _, _ = _prepare(tmp_path, train=str(folder), eval=str(folder), eval_split="train[:1]", builder="json")
    assert rows == EXPECTED


def test_a_data_folder_with_inferred_splits(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    _write_jsonl(folder / "train.jsonl", [{"messages": _messages(i)} for i in range(6)])
    _write_jsonl(folder / "test.jsonl", [{"messages": _messages(i)} for i in range(2)])
    rows, eval_rows, _ = _prepare(tmp_path, train=str(folder), eval=str(folder), eval_split="test")
    assert rows == EXPECTED and eval_rows == EXPECTED[:2]


def test_eval_fraction_keeps_the_shuffle_it_always_had(tmp_path: Path) -> None:
    source = [{"messages": _messages(i)} for i in range(40)]
    train = _write_jsonl(tmp_path / "t.jsonl", source)
    rows, eval_rows, meta = _prepare(tmp_path, train=str(train), eval_fraction=0.1, seed=3)
    shuffled = source[:]
    random.Random(3).shuffle(shuffled)  # the list shuffle the stage did before rows stayed in Arrow
    normal = [_normal(r["messages"][:1], r["messages"][1]["content"]) for r in shuffled]
    assert eval_rows == normal[:4] and rows == normal[4:]
    assert meta["source_rows"] == {"train": 36, "eval": 4}


# ---------------------------------------------------------------- the hub, from an offline cache


def _cache_hub_dataset(cache: Path, repo: str, commit: str, rows: list[dict]) -> None:
    """What `load_dataset(repo)` leaves in datasets' cache after a download at `commit`: the split's
    Arrow file and dataset_info.json under <owner>___<name>/default/0.0.0/<commit>/."""
    from datasets import Dataset, DatasetInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.splits import SplitDict, SplitInfo

    owner, name = repo.split("/")
    folder = cache / f"{owner}___{name}" / "default" / "0.0.0" / commit
    folder.mkdir(parents=True)
    dataset = Dataset.from_list(rows)
    with ArrowWriter(path=str(folder / f"{name}-train.arrow"), features=dataset.features) as writer:
        writer.write_table(dataset.data.table)
        writer.finalize()
    splits = SplitDict({"train": SplitInfo("train", num_examples=len(rows), num_bytes=0, dataset_name=name)})
    DatasetInfo(features=dataset.features, config_name="default", dataset_name=name, splits=splits).write_to_directory(
        str(folder)
    )


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """Offline mode with `org/toy` cached at SHA: the real `load_dataset(hub_id, revision=..., split=...)`
    path runs (the hub is unreachable, datasets falls back to its cache)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-datasets"
    _cache_hub_dataset(cache, "org/toy", SHA, [{"messages": _messages(i)} for i in range(6)])
    return cache


def test_a_hub_dataset_pinned_to_a_commit_with_a_sliced_split(tmp_path: Path, hub_cache: Path) -> None:
    cfg = DataConfig(train="org/toy", revision=SHA, split="train[:4]", eval="org/toy", eval_split="train[4:]")
    assert data_stage.data_sources(cfg)["train"].kind == "hub"
    key = data_key(cfg)
    assert key is not None  # pinned: known before anything is loaded
    rows, eval_rows, _ = _prepare(tmp_path, **cfg.model_dump())
    assert rows == EXPECTED[:4] and eval_rows == EXPECTED[4:]
    assert data_key(cfg.model_copy(update={"revision": OTHER_SHA})) != key


def test_an_unpinned_hub_dataset_is_keyed_by_what_was_loaded(tmp_path: Path, hub_cache: Path) -> None:
    cfg = DataConfig(train="org/toy", eval_fraction=0.5)
    assert data_key(cfg) is None  # never cached ahead of the stage, like an unpinned hub model
    store = Store(tmp_path / "artifacts")
    first = prepare_data(cfg, store)
    again = prepare_data(cfg, store)
    assert again.cached and again.key == first.key
    shutil.rmtree(hub_cache / "org___toy")  # the hub moved on: new content, new key
    _cache_hub_dataset(hub_cache, "org/toy", OTHER_SHA, [{"messages": _messages(i)} for i in range(8)])
    assert prepare_data(cfg, store).key != first.key


def test_an_offline_copy_at_another_commit_is_refused(tmp_path: Path, hub_cache: Path) -> None:
    cfg = DataConfig(train="org/toy", revision=OTHER_SHA)
    with pytest.raises(
        ConfigError,
        match=rf"data\.train: the copy of org/toy that datasets loaded is at commit {SHA}, not the pinned revision {OTHER_SHA}",
    ):
        prepare_data(cfg, Store(tmp_path / "artifacts"))


def test_an_unknown_hub_id_offline_is_one_line(hub_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.train: cannot read org/missing: ConnectionError: ") as err:
        check_data(DataConfig(train="org/missing"), "data", 200)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- keys


def test_the_key_follows_bytes_not_paths(tmp_path: Path) -> None:
    first = _write_jsonl(tmp_path / "a" / "train.jsonl", [{"messages": _messages(i)} for i in range(3)])
    moved = tmp_path / "b" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    key = data_key(DataConfig(train=str(first)))
    assert data_key(DataConfig(train=str(moved))) == key
    _write_jsonl(moved, [{"messages": _messages(i)} for i in range(4)])
    assert data_key(DataConfig(train=str(moved))) != key


def test_a_folder_key_follows_its_content_not_its_place(tmp_path: Path) -> None:
    _dataset(3).save_to_disk(str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert data_key(DataConfig(train=str(tmp_path / "one"))) == data_key(DataConfig(train=str(tmp_path / "two")))
    shutil.rmtree(tmp_path / "two")
    _dataset(4).save_to_disk(str(tmp_path / "two"))
    assert data_key(DataConfig(train=str(tmp_path / "one"))) != data_key(DataConfig(train=str(tmp_path / "two")))


# ---------------------------------------------------------------- bad inputs


BAD_ROWS = {
    "messages: unknown role": ("messages", {}, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
                               r"row 3, column 'messages', message 2: expected role in \['assistant', 'system', 'user'\] and text content \(got \{'role': 'bot'"),
    "messages: ends with the user": ("messages", {}, {"messages": [{"role": "user", "content": "q"}]},
                                     r"row 3, column 'messages': the last message must be the assistant's answer"),
    "alpaca: no output": ("alpaca", {}, {"instruction": "Add", "input": "1", "output": None},
                          r"row 3, column 'output': expected text \(got None\)"),
    "sharegpt: unknown speaker": ("sharegpt", {}, {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "a"}]},
                                  r"row 3, column 'conversations', message 2: expected from in \['assistant', 'bard', .*\] and text value"),
    "prompt_response: empty prompt": ("prompt_response", {"prompt_field": "q", "response_field": "a"}, {"q": None, "a": "x"},
                                      r"row 3, column 'q': expected text \(got None\)"),
}  # fmt: skip
GOOD = {"messages": {"messages": _messages(0)}, "alpaca": {"instruction": "Add", "input": "1", "output": "2"},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "prompt_response": {"q": "q", "a": "a"}}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_named_with_its_row_and_column(tmp_path: Path, case: str) -> None:
    fmt, fields, bad, pattern = BAD_ROWS[case]
    train = _write_jsonl(tmp_path / "bad.jsonl", [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]])
    cfg = DataConfig.model_validate({"train": str(train), "format": fmt, **fields})
    with pytest.raises(ConfigError, match=rf"^{train}: {pattern}") as err:
        check_data(cfg, "data", 200)
    assert "\n" not in str(err.value)


def test_a_bad_row_past_the_sample_is_named_by_the_stage(tmp_path: Path) -> None:
    rows = [{"messages": _messages(i)} for i in range(300)]
    rows[249] = {"messages": [{"role": "user", "content": "no answer"}]}
    train = _write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(train))
    check_data(cfg, "data", 200)  # pre-flight reads a sample
    with pytest.raises(ConfigError, match=rf"^{train}: row 250, column 'messages': the last message"):
        prepare_data(cfg, Store(tmp_path / "artifacts"))
    assert not list((tmp_path / "artifacts" / "store").glob("data/*"))


BAD_SOURCES = {
    "invalid JSON line": ("bad.jsonl", '{"messages": []}\n{"messages": \n', {}, r"bad\.jsonl:2: not valid JSON \(Expecting value\)"),
    "a column the format needs": ("x.jsonl", '{"conversation": []}\n', {}, r"x\.jsonl: row 1 has no column 'messages' \(columns: conversation\)"),
    "a suffix that says nothing": ("rows.txt", "x\n", {}, r"data\.train: cannot tell the file type of .*rows\.txt from its suffix; set data\.builder"),
    "a glob that matches nothing": ("*.parquet", None, {}, r"data\.train: no file matches .*\*\.parquet"),
    "revision of a local file": ("x.jsonl", '{"messages": []}\n', {"revision": SHA}, r"data\.revision: only a hub dataset has a revision"),
    "a split a file does not have": ("x.jsonl", json.dumps({"messages": _messages(0)}) + "\n", {"split": "test"},
                                     r"data\.train: cannot read .*x\.jsonl: ValueError: .*test"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_a_bad_source_is_one_line(tmp_path: Path, case: str) -> None:
    name, content, extra, pattern = BAD_SOURCES[case]
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=pattern) as err:
        check_data(DataConfig.model_validate({"train": str(tmp_path / name), **extra}), "data", 200)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- through the CLI


def _validate(capsys, tmp_path: Path, *overrides: str) -> tuple[int, str, str]:
    """`ftd validate` through `app.cli.main` in this process; the environment it sets is restored."""
    from app.cli import main
    from tests.conftest import DEFAULT_CONFIG

    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(("PREFECT_", "MLFLOW_"))]:
        del os.environ[name]
    capsys.readouterr()
    try:
        code = main(["validate", str(DEFAULT_CONFIG), "--set", f"artifacts_dir={tmp_path / 'artifacts'}", *overrides])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_names_a_bad_alpaca_row_before_compute(tmp_path: Path, capsys) -> None:
    rows = [{"instruction": "Even or odd: 4", "output": "even"}, {"instruction": "Even or odd: 3"}]
    train = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    code, _, err = _validate(capsys, tmp_path, "--set", f"adapters.0.data={{train: {train}, format: alpaca}}")
    assert code == 2
    assert err.strip().splitlines() == [f"ftd: config error: {train}: row 2, column 'output': expected text (got None)"]
    assert not (tmp_path / "artifacts" / "store").exists()


def test_validate_accepts_an_alpaca_copy_of_the_shipped_data(tmp_path: Path, capsys) -> None:
    root = Path(__file__).resolve().parent.parent / "data" / "numbers"
    for split in ("train", "eval"):
        rows = [json.loads(line)["messages"] for line in (root / f"{split}.jsonl").read_text().splitlines()]
        _write_jsonl(
            tmp_path / f"{split}.jsonl",
            [{"instruction": m[0]["content"], "input": "", "output": m[1]["content"]} for m in rows],
        )
    code, out, err = _validate(capsys, tmp_path, "--set", f"adapters.0.data={{train: {tmp_path / 'train.jsonl'}, "
                               f"eval: {tmp_path / 'eval.jsonl'}, format: alpaca}}")  # fmt: skip
    assert code == 0, err
    assert "is valid" in out


def test_the_stage_names_an_invalid_json_line_too(tmp_path: Path) -> None:
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"messages": _messages(0)}) + "\n{oops\n")
    with pytest.raises(ConfigError, match=rf"^{train}:2: not valid JSON"):
        prepare_data(DataConfig(train=str(train)), Store(tmp_path / "artifacts"))


def test_large_data_is_normalised_in_several_processes_with_the_same_rows_and_errors(
    tmp_path: Path, monkeypatch
) -> None:
    source = [{"messages": _messages(i)} for i in range(30)]
    train = _write_jsonl(tmp_path / "t.jsonl", source)
    serial, eval_serial, _ = _prepare(tmp_path / "serial", train=str(train), eval_fraction=0.2)
    monkeypatch.setattr(data_stage, "LARGE", 1)
    monkeypatch.setattr(data_stage.os, "cpu_count", lambda: 2)
    parallel, eval_parallel, _ = _prepare(tmp_path / "parallel", train=str(train), eval_fraction=0.2)
    assert (parallel, eval_parallel) == (serial, eval_serial)  # in order: the shards are joined as they were
    source[20] = {"messages": [{"role": "user", "content": "no answer"}]}
    _write_jsonl(train, source)
    with pytest.raises(ConfigError, match=rf"^{train}: row 21, column 'messages': the last message"):
        prepare_data(DataConfig(train=str(train)), Store(tmp_path / "artifacts"))


# ---------------------------------------------------------------- token statistics (issue #26, item 4)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The builtin models' tokenizer and chat template, saved as a base model's folder would hold them."""
    from ftd.builtin_models import BUILTINS, train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(BUILTINS["tiny-llama"]).save_pretrained(folder)
    return folder


def _base(folder: Path, key: str = "base-key") -> Artifact:
    return Artifact(stage="base", key=key, meta={"model_dir": str(folder)})


def _trl_length(folder: Path, row: dict) -> int:
    """A normal row's length as TRL's SFTTrainer tokenises a conversational prompt/completion row."""
    from trl.data_utils import _tokenize

    from tasks.modeling import load_tokenizer

    return len(_tokenize(load_tokenizer(folder), row["prompt"] + row["completion"])["input_ids"])


def _long(i: int, words: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}" + " more" * words},
                         {"role": "assistant", "content": f"answer {i}"}]}  # fmt: skip


LONG_ROWS = [_long(i, words) for i, words in enumerate([0, 6, 1, 10, 1, 0, 8])]
MAX_LENGTH = 30  # between the short rows' lengths (21 to 25 tokens) and the long ones' (45 to 61)


def _stage(tmp_path: Path, tokenizer_dir: Path, rows: list[dict], max_length: int = MAX_LENGTH, **data):
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    evals = _write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    cfg = DataConfig.model_validate({"train": str(train), "eval": str(evals), **data})
    store = Store(tmp_path / "artifacts")
    artifact = prepare_data(cfg, store, _base(tokenizer_dir), max_length)
    return load_split(artifact, store, "train"), load_split(artifact, store, "eval"), artifact.meta


def test_token_statistics_count_what_trl_trains_on(tmp_path: Path, tokenizer_dir: Path) -> None:
    train, eval_rows, meta = _stage(tmp_path, tokenizer_dir, LONG_ROWS)
    lengths = [_trl_length(tokenizer_dir, row) for row in train]
    eval_lengths = [_trl_length(tokenizer_dir, row) for row in eval_rows]
    assert sum(n > MAX_LENGTH for n in lengths) == 3 and max(n for n in lengths if n <= MAX_LENGTH) < 26
    assert meta["tokens"] == {
        "max_length": MAX_LENGTH, "overlong": "warn", "dropped": 0,
        "train": {"rows": 7, "tokens": sum(lengths), "max_tokens": max(lengths), "over_max_length": 3},
        "eval": {"rows": 4, "tokens": sum(eval_lengths), "max_tokens": max(eval_lengths), "over_max_length": 2},
    }  # fmt: skip


def test_drop_removes_exactly_the_overlong_train_rows(tmp_path: Path, tokenizer_dir: Path) -> None:
    train, eval_rows, meta = _stage(tmp_path, tokenizer_dir, LONG_ROWS, overlong="drop")
    normal = [_normal(r["messages"][:1], r["messages"][1]["content"]) for r in LONG_ROWS]
    assert train == [normal[i] for i in (0, 2, 4, 5)]
    assert eval_rows == normal[:4]  # eval rows are never dropped, the overlong ones counted
    assert (meta["train_rows"], meta["tokens"]["dropped"], meta["tokens"]["eval"]["over_max_length"]) == (4, 3, 2)


def test_drop_that_leaves_nothing_is_one_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^data\.overlong: drop leaves no train rows: all 7 are longer than max_length 20"
    ):
        _stage(tmp_path, tokenizer_dir, LONG_ROWS, max_length=20, overlong="drop")


@pytest.mark.parametrize(("policy", "warned"), [("warn", True), ("truncate", False)])
def test_warn_and_truncate_keep_the_overlong_rows(tmp_path: Path, tokenizer_dir: Path, caplog, policy, warned) -> None:
    with caplog.at_level("WARNING", logger="ftd.data"):
        train, _, meta = _stage(tmp_path, tokenizer_dir, LONG_ROWS, overlong=policy)
    assert train == [_normal(r["messages"][:1], r["messages"][1]["content"]) for r in LONG_ROWS]
    assert (meta["tokens"]["train"]["over_max_length"], meta["tokens"]["dropped"]) == (3, 0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ftd.data"]
    assert bool(warnings) is warned
    if warned:
        assert "3 of 7 train rows are longer than max_length 30 tokens" in warnings[0]
        assert "2 of 4 eval rows too" in warnings[0]


def test_the_key_follows_the_tokenizer_max_length_and_policy(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = DataConfig(train=str(_write_jsonl(tmp_path / "t.jsonl", LONG_ROWS)))
    key = data_key(cfg, _base(tokenizer_dir), 64)
    assert data_key(cfg, _base(tokenizer_dir), 64) == key
    assert data_key(cfg, _base(tokenizer_dir), 128) != key
    assert data_key(cfg, _base(tokenizer_dir, key="another-base"), 64) != key
    assert data_key(cfg.model_copy(update={"overlong": "drop"}), _base(tokenizer_dir), 64) != key
    assert data_key(cfg, None, 64) != key


def test_the_shipped_data_is_written_as_before(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The default experiment's rows are short: whatever the policy, train.jsonl and eval.jsonl are
    byte for byte what the stage wrote before it counted tokens (the source rows in the normal form,
    compact JSON: sha256 a859da41… for train), so the default SFT trains on the same rows."""
    from ftd.config import load_config
    from tests.conftest import DEFAULT_CONFIG

    adapter = load_config(DEFAULT_CONFIG).adapters[0]
    root = DEFAULT_CONFIG.parent.parent
    for policy in ("warn", "drop"):
        cfg = adapter.data.model_copy(update={"overlong": policy, "train": str(root / adapter.data.train),
                                              "eval": str(root / adapter.data.eval)})  # fmt: skip
        store = Store(tmp_path / policy)
        artifact = prepare_data(cfg, store, _base(tokenizer_dir), adapter.sft.max_length)
        assert artifact.meta["tokens"]["train"]["over_max_length"] == 0
        for split in ("train", "eval"):
            source = [json.loads(line)["messages"] for line in (root / f"data/numbers/{split}.jsonl").open()]
            expected = "".join(
                json.dumps({"prompt": m[:-1], "completion": m[-1:], "answer": m[-1]["content"]}, separators=(",", ":"))
                + "\n"
                for m in source
            )
            assert (artifact.path(store) / f"{split}.jsonl").read_text() == expected


def test_a_tokenizer_without_a_chat_template_is_one_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    from tasks.modeling import load_tokenizer

    bare = tmp_path / "bare"
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    with pytest.raises(ConfigError, match=r"^data\.chat_template: the base model's tokenizer has no chat template"):
        _stage(tmp_path, bare, LONG_ROWS)
    _, _, meta = _stage(tmp_path / "set", bare, LONG_ROWS, chat_template=load_tokenizer(tokenizer_dir).chat_template)
    assert meta["tokens"]["train"]["over_max_length"] == 3


def test_the_report_shows_one_data_line_and_logs_the_figures(tmp_path: Path, tokenizer_dir: Path) -> None:
    from flows.report import data_line, data_metrics
    from tasks.backends.base import AdapterChain

    _, _, meta = _stage(tmp_path, tokenizer_dir, LONG_ROWS, overlong="drop")
    tokens = meta["tokens"]["train"]["tokens"]
    assert data_line(meta) == (
        f"data: 7 train rows, {tokens:,} tokens (max {meta['tokens']['train']['max_tokens']}), 3 over max_length 30: "
        "dropped (data.overlong: drop), 4 train rows left; eval: 2 of 4 rows over max_length 30 (kept)"
    )
    chain = AdapterChain("numbers", Artifact(stage="data", key="k", meta=meta), *[None] * 3)
    assert data_metrics([chain]) == {"numbers.data.train_tokens": tokens, "numbers.data.over_max_length": 3}
    assert data_line({"train_rows": 3}) is None  # made without a tokenizer: no statistics, no line


def test_tokens_are_counted_and_dropped_the_same_in_several_processes(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch
) -> None:
    rows = LONG_ROWS * 5
    serial = _stage(tmp_path / "serial", tokenizer_dir, rows, overlong="drop")
    monkeypatch.setattr(data_stage, "LARGE", 1)
    monkeypatch.setattr(data_stage.os, "cpu_count", lambda: 2)
    parallel = _stage(tmp_path / "parallel", tokenizer_dir, rows, overlong="drop")
    assert parallel[:2] == serial[:2] and parallel[2]["tokens"] == serial[2]["tokens"]
    assert serial[2]["tokens"]["dropped"] == 15


def test_a_row_the_chat_template_refuses_is_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")  # fmt: skip
    rows = [{"messages": _messages(0)}, {"messages": [{"role": "system", "content": "s"}, *_messages(1)]}]
    with pytest.raises(
        ConfigError, match=r"^data\.chat_template: cannot apply it to train row 2: TemplateError: no system turns$"
    ):
        _stage(tmp_path, tokenizer_dir, rows, chat_template=template)
