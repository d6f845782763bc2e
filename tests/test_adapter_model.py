"""A registered adapter's base model is referenced, never stored: at load its files' digest must
equal the one recorded (no silent load on other weights, mlflow#23761)."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from tasks.base_model import fetch, files_digest
from tasks.serving.chat import verified_base


def test_the_base_is_rebuilt_and_accepted_only_with_the_recorded_digest(tmp_path) -> None:
    recorded = files_digest(fetch("builtin:tiny-llama", None))  # builtins rebuild byte for byte
    folder = verified_base({"source": "builtin:tiny-llama", "files_digest": recorded})
    assert (folder / "model.safetensors").is_file()
    with pytest.raises(MlflowException, match="differ from those the adapter was trained on"):
        verified_base({"source": "builtin:tiny-llama", "files_digest": "0" * 64})


def test_a_local_base_whose_weights_changed_is_refused(tmp_path) -> None:
    folder = fetch("builtin:tiny-llama", None)
    recorded = files_digest(folder)
    assert verified_base({"source": str(folder), "files_digest": recorded}) == folder
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("silu", "gelu"))
    with pytest.raises(MlflowException, match=f"base model {folder}: its files"):
        verified_base({"source": str(folder), "files_digest": recorded})
