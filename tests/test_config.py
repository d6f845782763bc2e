"""Config schema and overrides: errors carry the key's path; overrides reach nested lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.config import apply_override, flatten, load_config
from ftd.errors import ConfigError

DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "tiny-llama.yaml"


def test_default_config_loads() -> None:
    cfg = load_config(DEFAULT)
    assert cfg.base_model == "builtin:tiny-llama"
    assert cfg.adapters[0].lora.scale == 2.0
    assert [t.backend for t in cfg.targets] == ["onnx_genai"]


def test_overrides_reach_nested_list_items_and_parse_yaml_values() -> None:
    cfg = load_config(DEFAULT, ["adapters.0.lora.r=16", "adapters.0.lora.target_modules=[q_proj, v_proj]",
                                "adapters.0.lora.rslora=true", "smoke.prompts=[hello]"])  # fmt: skip
    lora = cfg.adapters[0].lora
    assert (lora.r, lora.target_modules, lora.rslora) == (16, ["q_proj", "v_proj"], True)
    assert lora.scale == pytest.approx(16 / 4)
    assert cfg.smoke.prompts == ["hello"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapters.3.lora.r=4", "index 3 out of range"),
        ("adapters.0.lora.alpha=-1", "`adapters.0.lora.alpha`: Input should be greater than 0"),
        ("adapters.0.sft.max_steps=0", "must be -1 (use epochs) or a positive number of steps"),
        ("targets.0.name=../../etc", "`targets.0.name`: String should match pattern"),
        ("adapters.0.data.prompt_field=q", "set both prompt_field and response_field"),
        ("adapters.0.data.format=jsonl", "`adapters.0.data.format`: Value error, 'jsonl' is a file type: use `builder: json` instead"),
        ("adapters.0.data.format=csv", "'csv' is a file type: use `builder: csv` instead"),
        ("adapters.0.data.format=yaml", "`adapters.0.data.format`: Input should be 'messages', 'alpaca', 'sharegpt' or 'prompt_response'"),
        ("adapters.0.data.builder=jsonl", "`adapters.0.data.builder`: Input should be 'auto', 'json', 'csv', 'parquet' or 'arrow'"),
        ("adapters.0.data.eval=data/numbers/train.jsonl", "eval is the same source and split as train: set eval_split"),
        ("smok.max_prompts=3", "unknown key `smok` (did you mean `smoke`?)"),
    ],
)
def test_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, [override])
    assert message in str(err.value)


def test_data_format_names_the_layout_and_prompt_fields_imply_it() -> None:
    """`format` named the file type before #26; prompt/response fields alone still mean prompt_response."""
    from ftd.config import DataConfig

    assert DataConfig(train="t.csv").format == "messages"
    legacy = DataConfig(train="t.csv", prompt_field="q", response_field="a")
    assert (legacy.format, legacy.columns) == ("prompt_response", ("q", "a"))
    assert DataConfig(train="t.json", format="sharegpt").columns == ("conversations",)
    assert DataConfig(train="t.json", format="alpaca").columns == ("instruction", "output")
    with pytest.raises(ValueError, match="prompt_field and response_field are for format prompt_response, not alpaca"):
        DataConfig(train="t.csv", format="alpaca", prompt_field="q", response_field="a")
    assert DataConfig(train=Path("data/x.jsonl")).train == "data/x.jsonl"


def test_duplicate_adapter_names_are_refused() -> None:
    raw: dict = {"experiment": "x", "base_model": "builtin:tiny-llama",
                 "adapters": [{"name": "a", "data": {"train": "t.jsonl"}}, {"name": "a", "data": {"train": "t.jsonl"}}]}  # fmt: skip
    from ftd.config import validate_config

    with pytest.raises(ConfigError, match="names must be unique, repeated: a"):
        validate_config(raw)


def test_apply_override_creates_missing_mappings() -> None:
    raw: dict = {}
    apply_override(raw, "tracking.uri=http://127.0.0.1:5000")
    assert raw == {"tracking": {"uri": "http://127.0.0.1:5000"}}


def test_flatten_names_list_items_by_name() -> None:
    flat = flatten(load_config(DEFAULT))
    assert flat["adapters.numbers.lora.r"] == "8"
    assert flat["targets.onnx-fp32.precision"] == "fp32"
