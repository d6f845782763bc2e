"""DashInfer: the 2.x multi-LoRA bundle (checked on CPU) and the target's config-time limits.

The CPU engine itself runs in tests/test_e2e_other_backends.py (it needs DashInfer's own
environment, created on first use).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from tasks.backends.dashinfer import env
from tasks.backends.dashinfer.lora_bundle import LAUNCH, check_adapter, rewrite_adapter, write_bundle
from tasks.backends.registry import get_backend
from tests.test_merge import build_base
from tests.test_trtllm_lora import make_peft, peft_deltas


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("dashinfer") / "base")


def lora_target(**options) -> TargetConfig:
    return TargetConfig(name="di-lora", backend="dashinfer", mode="multi_lora", precision="bf16", device="cuda",
                        options=options)  # fmt: skip


@pytest.mark.parametrize(
    "lora",
    [{}, {"use_rslora": True, "r": 8, "lora_alpha": 4}, {"alpha_pattern": {"v_proj": 32, "down_proj": 2}}],
    ids=["plain", "rslora", "alpha-pattern"],
)
def test_served_update_equals_the_trained_one(base: Path, tmp_path: Path, lora: dict):
    """DashInfer applies lora_alpha/r to B@A: whatever the adapter's own scaling, that must give peft's ΔW."""
    peft_model = make_peft(base, tmp_path / "peft", **lora)
    info = rewrite_adapter("a", tmp_path / "peft", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["alpha_pattern"] == {} and config["rank_pattern"] == {}
    tensors = torch.load(tmp_path / "out" / "adapter_model.bin", weights_only=True)  # tensors only
    plain = config["lora_alpha"] / config["r"]
    for (layer, module), expected in peft_deltas(peft_model).items():
        prefix = next(k for k in tensors if f"layers.{layer}." in k and f".{module}.lora_A" in k).removesuffix(
            ".lora_A.weight"
        )
        served = plain * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(served, torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    assert info["rescaled_modules"] == (0 if not lora else 14 if "use_rslora" in lora else 4)
    assert check_adapter("a", tmp_path / "peft", tmp_path / "out") < 1e-6


def test_a_wrong_rescale_is_caught(base: Path, tmp_path: Path):
    make_peft(base, tmp_path / "peft", use_rslora=True, r=8, lora_alpha=4)
    rewrite_adapter("a", tmp_path / "peft", tmp_path / "out")
    config_path = tmp_path / "out" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] *= 2  # what the served update would be if the config said something else
    config_path.write_text(json.dumps(config))
    with pytest.raises(FtdError, match="DashInfer's ΔW would differ"):
        check_adapter("a", tmp_path / "peft", tmp_path / "out")


def test_refusals(base: Path, tmp_path: Path):
    make_peft(base, tmp_path / "ranks", rank_pattern={"q_proj": 2})
    with pytest.raises(FtdError, match="rank_pattern .* single `r`"):
        rewrite_adapter("ranks", tmp_path / "ranks", tmp_path / "out1")
    make_peft(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(FtdError, match="adapter dora cannot be served by DashInfer: .*DoRA"):
        rewrite_adapter("dora", tmp_path / "dora", tmp_path / "out2")


def test_bundle_layout_and_launch_script(base: Path, tmp_path: Path):
    make_peft(base, tmp_path / "wide", r=8, lora_alpha=16)
    make_peft(base, tmp_path / "narrow", r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])
    options = {"lora_max_num": None, "lora_max_rank": None, "max_length": 512, "max_batch": 4}
    out = tmp_path / "bundle"
    manifest = write_bundle(base, [("wide", tmp_path / "wide"), ("narrow", tmp_path / "narrow")], options, "bf16", out)
    assert manifest["lora_max_num"] == 2 and manifest["lora_max_rank"] == 8 and manifest["data_type"] == "bfloat16"
    for name in ("wide", "narrow"):
        assert sorted(p.name for p in (out / "loras" / name).iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    assert (out / "hf_model" / "config.json").is_file()
    script = (out / LAUNCH).read_text()
    tree = ast.parse(script)  # valid Python
    constants = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant | ast.List)}  # fmt: skip
    assert constants["LORA_NAMES"] == ["narrow", "wide"] and constants["LORA_MAX_RANK"] == 8
    assert constants["LORA_MAX_NUM"] == 2 and constants["DATA_TYPE"] == "bfloat16"
    for call in ("serialize_to_path", "lora_max_num(LORA_MAX_NUM)", "lora_max_rank(LORA_MAX_RANK)", "load_lora",
                 '"lora_name": args.lora'):  # fmt: skip
        assert call in script
    assert "rescaled into B" in (out / "README.md").read_text()


def test_config_time_limits():
    backend = get_backend("dashinfer")
    adapters = [{"name": "wide", "modules": ["q_proj"], "max_rank": 16}, {"name": "b", "modules": [], "max_rank": 4}]
    with pytest.raises(ConfigError, match="lora_max_rank: 8 is below adapter wide's rank 16"):
        backend.check_adapters(lora_target(lora_max_rank=8), adapters)
    with pytest.raises(ConfigError, match="lora_max_num: 1 < 2 adapters"):
        backend.check_adapters(lora_target(lora_max_num=1), adapters)
    with pytest.raises(ConfigError, match="not Phi3ForCausalLM"):
        backend.check(lora_target(), "Phi3ForCausalLM")
    with pytest.raises(ConfigError, match="multi-LoRA runs on CUDA"):
        backend.check(lora_target().model_copy(update={"device": "cpu"}), "LlamaForCausalLM")
    cpu = TargetConfig(name="di", backend="dashinfer", precision="int4")
    with pytest.raises(ConfigError, match="CPU engine is built as precision fp32"):
        backend.check(cpu, "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="unknown key `lora_rank`"):
        backend.check(lora_target(lora_rank=8), "LlamaForCausalLM")
    assert "GPU" in backend.unavailable_reason(lora_target())


def test_environment_is_named_by_its_requirements(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FTD_CACHE_DIR", str(tmp_path))
    first = env.env_dir()
    assert first.parent == tmp_path / "envs" and first.name.startswith("dashinfer-1.3.0-")
    monkeypatch.setattr(env, "REQUIREMENTS", (*env.REQUIREMENTS, "extra==1"))
    assert env.env_dir() != first  # a changed pin never reuses an old environment
