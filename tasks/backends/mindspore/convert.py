"""Convert a merged Hugging Face checkpoint to MindFormers' weight layout (MindSpore / MindSpore Lite on Ascend).

MindFormers deploys in three steps: merge the LoRA adapter (ftd's streaming merge already does it), convert the
weights, deploy with MindSpore Lite. This module is step 2 for MindFormers' legacy `LlamaForCausalLM` (which also
serves Qwen2 with `qkv_has_bias: True`): HF names are renamed as mindformers/models/llama/convert_weight.py and
research/qwen2_5/convert_weight.py do (`model.` prefix kept, q/k NOT permuted: HF weights are already in the
rotate-half layout MindFormers expects), tensor by tensor, into one safetensors file that MindFormers loads with
`load_ckpt_format: safetensors`. Every conversion is checked by mapping the names back with an independently
written parser (`hf_name`) and comparing every tensor bit for bit, so a wrong table entry cannot ship.

The MindSpore `.ckpt` is written only when the optional `mindspore` package is importable (it has CPU wheels);
the deploy step itself needs Ascend hardware and `mindspore_lite`, see `ascend_deploy_status`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path

from ftd.errors import FtdError
from tasks.merge import SafetensorsReader, dtype_names, write_safetensors

SAFETENSORS_NAME = "mindformers.safetensors"
CKPT_NAME = "mindformers.ckpt"
CKPT_SKIPPED = "mindspore is not installed (optional extra: pip install mindspore)"
ASCEND_ROOT = Path("/usr/local/Ascend")
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")  # fmt: skip
# Recomputed from the config by every runtime, so legitimately absent after conversion (old HF Llama checkpoints).
RECOMPUTED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_LAYER_MODULES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _table(bias_modules: tuple[str, ...]) -> dict[str, str | None]:
    """HF name regex -> MindFormers name template (None: dropped on purpose)."""
    table: dict[str, str | None] = {
        r"model\.embed_tokens\.weight": "model.tok_embeddings.embedding_weight",
        r"model\.norm\.weight": "model.norm_out.weight",
        r"lm_head\.weight": "lm_head.weight",
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": None,
    }
    for hf, mf in _LAYER_MODULES.items():
        table[rf"model\.layers\.(\d+)\.{re.escape(hf)}\.weight"] = rf"model.layers.\1.{mf}.weight"
    for hf in bias_modules:
        table[rf"model\.layers\.(\d+)\.{re.escape(hf)}\.bias"] = rf"model.layers.\1.{_LAYER_MODULES[hf]}.bias"
    return table


KEY_MAPS: dict[str, dict[str, str | None]] = {
    "LlamaForCausalLM": _table(()),
    "Qwen2ForCausalLM": _table(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
}

# The reverse direction, written from MindFormers' side (convert_reversed.py), not derived from KEY_MAPS.
_MF_TOP = {"model.tok_embeddings.embedding_weight": "model.embed_tokens.weight",
           "model.norm_out.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}  # fmt: skip
_MF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)"
                       r"\.(weight|bias)$")  # fmt: skip
_HF_MODULE = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
              "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
              "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}  # fmt: skip
_MF_BIASES = {"Qwen2ForCausalLM": {"attention.wq", "attention.wk", "attention.wv"}}


def _check_architecture(architecture: str) -> None:
    if architecture not in KEY_MAPS:
        raise FtdError(f"architecture {architecture!r} has no MindFormers conversion; supported: {', '.join(KEY_MAPS)}")


def hf_name(mf_name: str, architecture: str) -> str:
    """The HF name of a MindFormers tensor name; unknown names are errors, not passed through."""
    if mf_name in _MF_TOP:
        return _MF_TOP[mf_name]
    match = _MF_LAYER.match(mf_name)
    if not match or (match[3] == "bias" and match[2] not in _MF_BIASES.get(architecture, ())):
        raise FtdError(f"{mf_name!r} is not a MindFormers {architecture} tensor name")
    return f"model.layers.{match[1]}.{_HF_MODULE[match[2]]}.{match[3]}"


def mindformers_to_hf(converted_file: Path, architecture: str) -> dict:
    """All tensors of a converted file under their HF names (dict[str, torch.Tensor]), for round-trip checks."""
    from safetensors.torch import load_file

    _check_architecture(architecture)
    return {hf_name(name, architecture): tensor for name, tensor in load_file(converted_file).items()}


def _mf_name(name: str, table: dict[str, str | None], where: Path) -> str | None:
    for pattern, template in table.items():
        if re.fullmatch(pattern, name):
            return None if template is None else re.sub(rf"^{pattern}$", template, name)
    raise FtdError(f"{where}: tensor {name!r} has no MindFormers name (is the model really this architecture?)")


def _check_config(config: dict, architecture: str, config_path: Path) -> None:
    """Refuse what MindFormers' LlamaConfig cannot express rather than deploy a model that answers differently."""
    if architecture not in config.get("architectures", [architecture]):
        raise FtdError(f"{config_path}: architectures={config['architectures']}, but {architecture} was requested")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, hidden // heads):
        raise FtdError(f"{config_path}: head_dim={config['head_dim']} != hidden_size/num_attention_heads; "
                       "MindFormers' LlamaConfig derives it from them")  # fmt: skip
    for field in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(field):
            raise FtdError(f"{config_path}: {field}=true is not supported by the MindFormers conversion")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "linear", "llama3"):
        raise FtdError(f"{config_path}: rope_scaling {scaling} is not supported (only linear and llama3)")


def _shards(merged_dir: Path) -> list[Path]:
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (merged_dir / n).is_file()]
        if missing:
            raise FtdError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
        return [merged_dir / n for n in names]
    shards = sorted(merged_dir.glob("*.safetensors"))
    if not shards:
        raise FtdError(f"{merged_dir}: no *.safetensors weights (MindFormers conversion reads the merged checkpoint)")
    return shards


def convert_to_mindformers(merged_dir: Path, out: Path, architecture: str, dtype: str = "auto") -> dict:
    """Write `out/mindformers.safetensors`, `out/predict_<arch>.yaml`, `out/tokenizer/` (+ `.ckpt` with mindspore)."""

    _check_architecture(architecture)
    if dtype != "auto" and dtype not in DTYPES:
        raise FtdError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    config_path = merged_dir / "config.json"
    if not config_path.is_file():
        raise FtdError(f"{merged_dir}: no config.json; is this a merged Hugging Face checkpoint?")
    config = json.loads(config_path.read_text())
    _check_config(config, architecture, config_path)
    table = KEY_MAPS[architecture]
    out.mkdir(parents=True, exist_ok=True)
    readers = [SafetensorsReader(shard) for shard in _shards(merged_dir)]
    try:
        specs, source, key_map, dropped = [], {}, {}, []
        for reader in readers:
            for name, stored, shape in reader.specs():
                mf = _mf_name(name, table, Path(reader.file.name))
                if mf is None:
                    dropped.append(name)
                    continue
                if mf in source:
                    raise FtdError(f"{reader.file.name}: {name} and {source[mf][1]} both map to {mf}")
                cast = DTYPES.get(dtype) if stored in ("F32", "F16", "BF16", "F64") else None
                specs.append((mf, cast or stored, shape))
                source[mf], key_map[name] = (reader, name), mf
        if "lm_head.weight" not in key_map and not config.get("tie_word_embeddings", False):
            raise FtdError(f"{merged_dir}: no lm_head.weight although tie_word_embeddings is false")
        target = {v: k for k, v in dtype_names().items()}
        written = {mf: stored for mf, stored, _ in specs}

        def produce(mf: str):
            reader, name = source[mf]
            return reader.read(name).to(target[written[mf]])

        total = write_safetensors(out / SAFETENSORS_NAME, specs, produce, {"format": "ms"})
        try:
            _round_trip(readers, out / SAFETENSORS_NAME, architecture)
        except FtdError:
            (out / SAFETENSORS_NAME).unlink()  # never leave a file that failed verification looking valid
            raise
    finally:
        for reader in readers:
            reader.file.close()
    param_dtype = {v: k for k, v in DTYPES.items()}.get(written.get("model.tok_embeddings.embedding_weight"), "float32")
    (out / "tokenizer").mkdir(exist_ok=True)
    tokenizer = [n for n in TOKENIZER_FILES if (merged_dir / n).is_file()]
    for name in tokenizer:
        shutil.copy2(merged_dir / name, out / "tokenizer" / name)
    section = _tokenizer_section(architecture, out / "tokenizer", tokenizer)
    yaml_path = out / f"predict_{architecture.removesuffix('ForCausalLM').lower()}.yaml"
    yaml_path.write_text(_predict_yaml(config, architecture, param_dtype, section))
    absent = [v for k, v in section.items() if k.endswith("_file") and not (out / v).is_file()]
    meta = {
        "architecture": architecture, "files": [SAFETENSORS_NAME, yaml_path.name, *(f"tokenizer/{n}" for n in tokenizer)],
        "tensors": len(specs), "bytes": total, "key_map": key_map, "dropped": dropped, "round_trip": "exact",
        "deploy": ascend_deploy_status(),
        "warnings": [f"{merged_dir}: no {Path(v).name}, which the predict YAML's tokenizer needs" for v in absent],
    }  # fmt: skip
    if importlib.util.find_spec("mindspore") is None:
        meta["ckpt"] = {"skipped": CKPT_SKIPPED}
    else:
        meta["ckpt"] = write_ckpt(out / SAFETENSORS_NAME, out / CKPT_NAME)
        meta["files"].append(CKPT_NAME)
    return meta


def _round_trip(readers: list, converted: Path, architecture: str) -> None:
    """HF -> MindFormers -> HF (via `hf_name`) must give the same names, shapes and bits as the merged checkpoint."""
    import torch

    expected = {n: r for r in readers for n, _, _ in r.specs() if not RECOMPUTED.match(n)}
    problems, names = [], {}
    with SafetensorsReader(converted) as back:
        for mf, _, _ in back.specs():
            try:
                names[hf_name(mf, architecture)] = mf
            except FtdError as exc:
                problems.append(str(exc))
        problems += [f"{n} is missing" for n in sorted(expected.keys() - names.keys())]
        problems += [f"{n} is unexpected" for n in sorted(names.keys() - expected.keys())]
        for name in sorted(expected.keys() & names.keys()):
            got = back.read(names[name])
            want = expected[name].read(name).to(got.dtype)
            if got.shape != want.shape:
                problems.append(f"{name} (as {names[name]}) has shape {list(got.shape)}, expected {list(want.shape)}")
            elif not got.reshape(-1).view(torch.uint8).equal(want.reshape(-1).view(torch.uint8)):
                problems.append(f"{name} (as {names[name]}) has different values")
    if problems:
        raise FtdError(f"{converted}: round trip back to HF names failed: {'; '.join(problems[:6])}")


def _tokenizer_section(architecture: str, tok_dir: Path, copied: list[str]) -> dict:
    """MindFormers' tokenizer entry (research/qwen2_5 Qwen2Tokenizer; LlamaTokenizer or LlamaTokenizerFast)."""
    if architecture == "Qwen2ForCausalLM":
        section = {"type": "Qwen2Tokenizer", "vocab_file": "tokenizer/vocab.json",
                   "merges_file": "tokenizer/merges.txt", "auto_register": "qwen2_5_tokenizer.Qwen2Tokenizer"}  # fmt: skip
    elif "tokenizer.model" in copied:
        section = {"type": "LlamaTokenizer", "vocab_file": "tokenizer/tokenizer.model"}
    else:
        section = {"type": "LlamaTokenizerFast", "vocab_file": "tokenizer/tokenizer.json",
                   "tokenizer_file": "tokenizer/tokenizer.json"}  # fmt: skip
    path = tok_dir / "tokenizer_config.json"
    tok_config = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            section[key] = token
    if isinstance(tok_config.get("chat_template"), str):
        section["chat_template"] = tok_config["chat_template"]
    return section


def _predict_yaml(config: dict, architecture: str, param_dtype: str, tokenizer_section: dict) -> str:
    """A MindFormers predict config (legacy LlamaConfig names, cf. configs/llama2/predict_llama2_7b.yaml)."""
    import yaml

    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    seq, eos, pad = config["max_position_embeddings"], config.get("eos_token_id"), config.get("pad_token_id")
    pad = pad if pad is not None else eos[0] if isinstance(eos, list) else eos
    extend = {"default": "None", "linear": "linear", "llama3": "LLAMA3"}[kind]
    factor = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")} if kind != "default" else 1.0
    model_config = {
        "type": "LlamaConfig", "batch_size": 1, "seq_length": seq,
        "hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"], "intermediate_size": config["intermediate_size"],
        "max_position_embedding": seq, "rms_norm_eps": config["rms_norm_eps"],
        "theta": float(config.get("rope_theta", 10000.0)), "extend_method": extend, "scaling_factor": factor,
        "qkv_has_bias": architecture in _MF_BIASES, "qkv_concat": False,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "bos_token_id": config.get("bos_token_id"), "eos_token_id": eos, "pad_token_id": pad,
        "compute_dtype": param_dtype, "param_init_type": param_dtype, "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32", "rotary_dtype": "float32", "use_past": True, "is_dynamic": True,
        "use_flash_attention": True, "block_size": 16, "num_blocks": -(-seq // 16), "checkpoint_name_or_path": "",
        "do_sample": False, "repetition_penalty": 1.0, "max_decode_length": 512,
    }  # fmt: skip
    document = {
        "seed": 0, "output_dir": "./output", "run_mode": "predict", "use_parallel": False, "use_legacy": True,
        "load_checkpoint": SAFETENSORS_NAME, "load_ckpt_format": "safetensors", "auto_trans_ckpt": False,
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": architecture.removesuffix("ForCausalLM").lower()},
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1},
        "context": {"mode": 0, "device_target": "Ascend", "device_id": 0},
        "model": {"model_config": model_config, "arch": {"type": "LlamaForCausalLM"}},
        "processor": {"return_tensors": "ms", "tokenizer": tokenizer_section,
                      "type": "Qwen2Processor" if architecture == "Qwen2ForCausalLM" else "LlamaProcessor"},
    }  # fmt: skip
    header = "# Written by ftd (tasks/backends/mindspore/convert.py). Paths are relative to this file's directory: run from it.\n"
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def write_ckpt(converted_file: Path, ckpt_path: Path) -> dict:
    """Save the converted tensors as a MindSpore checkpoint and load it back to check names, shapes and values.

    Needs only numpy and mindspore (no torch), so it also runs in a separate MindSpore environment. Unlike the
    safetensors file, a `.ckpt` is built from the whole model in memory (`mindspore.save_checkpoint` takes a list).
    """
    import mindspore as ms
    import numpy as np

    # safetensors dtype -> (numpy dtype of the stored bytes, MindSpore dtype); numpy has no bfloat16
    types = {"F32": (np.float32, ms.float32), "F16": (np.float16, ms.float16), "BF16": (np.uint16, ms.bfloat16)}
    arrays = {}
    with open(converted_file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if entry["dtype"] not in types:
                raise FtdError(f"{converted_file}: {name}: dtype {entry['dtype']} is not supported in a .ckpt")
            start, end = entry["data_offsets"]
            f.seek(8 + length + start)
            raw = np.frombuffer(f.read(end - start), dtype=types[entry["dtype"]][0])
            if entry["dtype"] == "BF16":  # widen exactly to float32; MindSpore narrows back exactly
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = (raw.reshape(entry["shape"]), types[entry["dtype"]][1])
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a, dtype=d)} for n, (a, d) in arrays.items()], str(ckpt_path))
    loaded = ms.load_checkpoint(str(ckpt_path))
    problems = sorted(set(arrays) ^ set(loaded))
    for name, (array, dtype) in arrays.items():
        if name not in loaded:
            continue
        param = loaded[name]
        back = (param.astype(ms.float32) if dtype == ms.bfloat16 else param).asnumpy()
        if param.dtype != dtype or back.shape != array.shape or not np.array_equal(back, array):
            problems.append(name)
    if problems:
        raise FtdError(f"{ckpt_path}: reloaded checkpoint differs from {converted_file.name}: {problems[:6]}")
    return {"file": ckpt_path.name, "tensors": len(arrays), "bytes": ckpt_path.stat().st_size, "verified": True}


def ascend_deploy_status(ascend_root: Path = ASCEND_ROOT) -> str:
    """Why ftd does not run the MindSpore Lite deploy step here (prefill + incremental MindIR graphs, GE config)."""
    lite = importlib.util.find_spec("mindspore_lite") is not None
    ascend = ascend_root.is_dir()
    if lite and ascend:
        return (f"not run by ftd: mindspore_lite and {ascend_root} are present; export the MindIR graphs with "
                "MindFormers (run_mode: export) from the predict YAML and serve them with MindSpore Lite")  # fmt: skip
    missing = [f"an Ascend NPU with CANN ({ascend_root} not found)"] * (not ascend)
    missing += ["the mindspore_lite package (no wheel for CPython 3.11)"] * (not lite)
    return (f"skipped: MindSpore Lite LLM inference needs {' and '.join(missing)}; the converted weights, predict "
            "YAML and tokenizer are ready to copy to an Ascend host")  # fmt: skip
