"""PEFT LoRA → TensorRT-LLM LoRA arrays (`lora_weights` / `lora_config`), and back again for checks.

TensorRT-LLM takes an adapter as two tensors (NVIDIA/TensorRT-LLM, examples/hf_lora_convert.py and
the runtime's LoRA validation):

- `lora_config` int32 `[N, 3]`: one row `[module_id, layer_idx, adapter_size]` per (layer, module);
- `lora_weights` `[N, max_row]` in the engine's dtype: each row is `A.flatten()` (`[r, in]`, peft's
  layout) followed by `(scale · B).flatten()` (`[out, r]`), zero-padded to the longest row.
  The runtime applies no scale, so alpha/r (alpha/sqrt(r) with rsLoRA) is folded into B.

Files carry a leading batch dimension of 1 (`.npy`, for `lora_prefetch_dir` and the Python
runtime); the raw `.bin` warm-up files are the same bytes without a header.

Everything the format cannot carry (embedding LoRA, `lm_head`, `modules_to_save`, DoRA, LoRA
biases) is refused with the adapter's name and the offending key: TensorRT-LLM's own converter
skips such keys silently, and the served model then quietly differs from the trained one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftd.errors import FtdError
from tasks.merge import module_scale, read_adapter

# TensorRT-LLM's LoRA module ids (tensorrt_llm/lora_manager.py, LoraModule::ModuleType).
MODULE_IDS = {
    "attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5,
    "mlp_4h_to_h": 6, "mlp_gate": 7, "cross_attn_qkv": 8, "cross_attn_q": 9, "cross_attn_k": 10,
    "cross_attn_v": 11, "cross_attn_dense": 12, "moe_h_to_4h": 13, "moe_4h_to_h": 14, "moe_gate": 15,
    "moe_router": 16, "mlp_router": 17, "mlp_gate_up": 18,
}  # fmt: skip
MODULE_NAMES = {v: k for k, v in MODULE_IDS.items()}
# HF projection name → TensorRT-LLM module. Note the MLP: TensorRT-LLM's "fc" (h_to_4h) is the
# activated branch, which HF calls gate_proj; its "gate" is HF's up_proj.
HF_TO_TRT = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "qkv_proj": "attn_qkv",
    "query_key_value": "attn_qkv", "o_proj": "attn_dense", "gate_proj": "mlp_h_to_4h",
    "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h", "gate_up_proj": "mlp_h_to_4h",
}  # fmt: skip
# Fused HF projections whose B halves TensorRT-LLM stores the other way round ([up; gate]).
SWAPPED_HALVES = {"gate_up_proj"}
LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)$")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
TRITON_TYPES = {"fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "fp32": "TYPE_FP32"}


def numpy_dtype(precision: str) -> np.dtype:
    """The storage dtype for an engine precision; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if precision == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[precision])


@dataclass
class TrtLora:
    """One adapter in TensorRT-LLM's layout (no batch dimension)."""

    name: str
    precision: str
    weights: np.ndarray  # [N, max_row], numpy_dtype(precision)
    config: np.ndarray  # [N, 3] int32
    sources: list[str] = field(default_factory=list)  # the peft module each row came from

    @property
    def rows(self) -> int:
        return int(self.config.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.config[:, 2].max())

    def modules(self) -> list[str]:
        return sorted({MODULE_NAMES[int(m)] for m in self.config[:, 0]})


def convert(name: str, adapter_path: Path, precision: str) -> TrtLora:
    """Read a PEFT adapter directory and produce its TensorRT-LLM arrays in `precision`."""

    if precision not in DTYPES:
        raise FtdError(f"TensorRT-LLM LoRA precision {precision!r}: expected one of {', '.join(DTYPES)}")
    try:
        config, pairs = read_adapter(adapter_path)
    except FtdError as exc:
        raise FtdError(f"adapter {name} cannot be served by TensorRT-LLM: {exc}") from None
    if config.get("fan_in_fan_out"):
        raise FtdError(f"adapter {name}: fan_in_fan_out adapters (Conv1D bases) are not supported by this converter")
    rows, meta, sources = [], [], []
    for pair in sorted(pairs.values(), key=lambda p: _sort_key(p.module)):
        match = LAYER_MODULE.search(pair.module)
        hf_module = match["module"] if match else pair.module.rsplit(".", 1)[-1]
        if match is None or hf_module not in HF_TO_TRT:
            raise FtdError(
                f"adapter {name}: LoRA on {pair.module!r} cannot be carried by TensorRT-LLM, which takes LoRA only "
                f"on per-layer projections ({', '.join(sorted(HF_TO_TRT))}); retrain without that module"
            )
        A = pair.A.float().numpy()  # [r, in]
        B = pair.B.float().numpy()  # [out, r]
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise FtdError(f"adapter {name}: {pair.module} has lora_A rank {rank} but lora_B rank {B.shape[1]}")
        B = B * module_scale(config, pair.module, rank)
        if hf_module in SWAPPED_HALVES:
            half = B.shape[0] // 2
            B = np.concatenate([B[half:], B[:half]])
        rows.append(np.concatenate([A.reshape(-1), B.reshape(-1)]))
        meta.append([MODULE_IDS[HF_TO_TRT[hf_module]], int(match["layer"]), rank])
        sources.append(pair.module)
    if not rows:
        raise FtdError(f"adapter {name}: no LoRA weights found in {adapter_path}")
    width = max(len(r) for r in rows)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        weights[i, : len(row)] = row
    return TrtLora(
        name=name,
        precision=precision,
        weights=weights.astype(numpy_dtype(precision)),
        config=np.asarray(meta, dtype=np.int32),
        sources=sources,
    )


def _sort_key(module: str) -> tuple:
    match = LAYER_MODULE.search(module)
    return (int(match["layer"]), module) if match else (-1, module)


# ---------------------------------------------------------------- files


def write_npy(lora: TrtLora, out_dir: Path) -> None:
    """`model.lora_weights.npy` [1, N, max_row] and `model.lora_config.npy` [1, N, 3] (the names
    `lora_prefetch_dir` and TensorRT-LLM's runtime look for)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "model.lora_weights.npy", lora.weights[None])
    np.save(out_dir / "model.lora_config.npy", lora.config[None])


def write_raw(lora: TrtLora, weights_path: Path, config_path: Path) -> None:
    """Raw little-endian bytes, no header: what Triton's `model_warmup` `input_data_file` reads."""
    weights_path.write_bytes(_little_endian(lora.weights).tobytes(order="C"))
    config_path.write_bytes(_little_endian(lora.config).tobytes(order="C"))


def read_raw(path: Path, precision_or_dtype: str | np.dtype, columns: int) -> np.ndarray:
    dtype = numpy_dtype(precision_or_dtype) if isinstance(precision_or_dtype, str) else np.dtype(precision_or_dtype)
    data = np.frombuffer(path.read_bytes(), dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    if data.size % columns:
        raise FtdError(f"{path}: {data.size} values do not fill rows of {columns}")
    return data.reshape(-1, columns)


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------- the runtime's view


def module_dims(model_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA module id, as TensorRT-LLM derives them from the model
    config (tensor parallelism 1)."""
    hidden = model_config["hidden_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or hidden // heads
    inter = model_config["intermediate_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "attn_q": (hidden, q), "attn_k": (hidden, kv), "attn_v": (hidden, kv), "attn_qkv": (hidden, q + 2 * kv),
        "attn_dense": (q, hidden), "mlp_h_to_4h": (hidden, inter), "mlp_gate": (hidden, inter),
        "mlp_4h_to_h": (inter, hidden), "mlp_gate_up": (hidden, 2 * inter),
    }  # fmt: skip


def fused_mlp_dims(model_config: dict) -> dict[str, tuple[int, int]]:
    """For models whose MLP input projection is fused (Phi-3's gate_up_proj): h_to_4h is twice as wide."""
    dims = module_dims(model_config)
    dims["mlp_h_to_4h"] = (model_config["hidden_size"], 2 * model_config["intermediate_size"])
    return dims


def split_row(row: np.ndarray, rank: int, in_dim: int, out_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A `[r, in]` and B `[out, r]` from one `lora_weights` row, by TensorRT-LLM's documented layout."""
    size_in, size_out = rank * in_dim, out_dim * rank
    if row.shape[0] < size_in + size_out:
        raise FtdError(f"row of {row.shape[0]} values is shorter than r·(in+out) = {size_in + size_out}")
    values = row.astype(np.float32)
    return values[:size_in].reshape(rank, in_dim), values[size_in : size_in + size_out].reshape(out_dim, rank)


def delta_weight(row: np.ndarray, rank: int, in_dim: int, out_dim: int) -> np.ndarray:
    """ΔW `[out, in]` that the engine adds for this row: B @ A (the scale is already in B)."""
    A, B = split_row(row, rank, in_dim, out_dim)
    return B @ A
