"""The og model builder, streamed: the same graph and the same int4 bytes, at a fraction of the memory.

The og builder (0.15.2) loads a bf16 checkpoint as an fp32 torch model (transformers' default
dtype), keeps every lazily cast fp32 weight alive in its graph, and quantises int4 in one pass
over a whole fp32 ModelProto at save time, so its peak is about 4-5 x the bf16 checkpoint: a
7B-class model (13.5 GB) would need ~60 GB. Patched here, from outside and without editing the
installed builder (`install()`, idempotent):

1. the model loads in its stored dtype (`dtype="auto"`): its weights stay views into the
   safetensors files' memory maps, read when used;
2. a lazily cast initializer no longer keeps its fp32 copy after it is written (the builder's
   closure rebinds its tensor to the cast one);
3. an int4 MatMul is quantised as soon as the builder emits it, with the very kernel and
   arguments the builder's whole-model pass uses (`quantize_matmul_4bits`, same block size,
   symmetry, accuracy level, names and node), so the fp32 weight lives for one call;
4. the file-backed pages a layer touched are dropped once the layer is emitted (`madvise`, only
   for clean pages of a `.safetensors` mapping; the kernel re-reads them if needed again);
5. the whole-model pass is skipped when nothing is left for it to quantise.

Anything else (qdq, int8, k-quant or RTN algorithms, excluded nodes, mixed precision, adapters
baked in with `adapter_path`, CUDA's fp16 graphs) takes the builder's own path unchanged.
tests/test_og_streaming.py checks that a streamed engine's graph and initializers equal the stock
builder's, byte for byte, for fp32 and int4 and for tied and untied embeddings.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

_INSTALLED = False
MADV_DONTNEED = 4
RELEASE_MIN_BYTES = 1 << 20


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import importlib

    importlib.import_module("onnxruntime_genai.models")  # puts the builder's folder on sys.path, as the builder does
    base = importlib.import_module("builders.base")  # the module object the builder itself uses

    _patch_loading(base)
    _patch_initializers(base)
    _patch_matmul(base)
    _patch_layers(base)
    _patch_to_nbits(base)
    _INSTALLED = True


# ---------------------------------------------------------------- 1. stored dtype, memory-mapped


def _patch_loading(base) -> None:
    stock = base.AutoModelForCausalLM

    class StoredDtype:
        """AutoModelForCausalLM, loading in the checkpoint's own dtype unless told otherwise."""

        @staticmethod
        def from_pretrained(*args, **kwargs):
            kwargs.setdefault("dtype", "auto")
            return stock.from_pretrained(*args, **kwargs)

        def __getattr__(self, name):  # pragma: no cover - anything else as the real class
            return getattr(stock, name)

    base.AutoModelForCausalLM = StoredDtype


# ---------------------------------------------------------------- 2. no fp32 copy kept


def _patch_initializers(base) -> None:
    ir, TorchTensor, to_torch_dtype = base.ir, base.TorchTensor, base.to_torch_dtype
    stock = base.Model.make_initializer

    def make_initializer(self, tensor, /, name: str, to=None):
        if to is None:
            return stock(self, tensor, name=name, to=to)
        source = tensor

        def cast():  # a fresh cast each time it is read; the source stays in its stored dtype
            out = source.to(to_torch_dtype(to))
            if out.data_ptr() != source.data_ptr():
                release_pages(source)
            return TorchTensor(out, name=name)

        ir_tensor = ir.LazyTensor(cast, dtype=to, shape=ir.Shape(source.shape), name=name)
        value = self.make_value(name, ir_tensor.dtype, ir_tensor.shape)
        value.const_value = ir_tensor
        self.model.graph.register_initializer(value)

    base.Model.make_initializer = make_initializer


# ---------------------------------------------------------------- 3. int4 as the builder emits it


def eager_int4(model, name: str) -> bool:
    """Whether this MatMul takes the streamed int4 path: exactly the cases in which the builder's
    whole-model pass would quantise it with its default (MLAS) quantiser into a MatMulNBits node."""
    ir = _ir()
    attrs = model.quant_attrs
    return (
        model.onnx_dtype in (ir.DataType.INT4, ir.DataType.UINT4)
        and attrs["bits"] == 4
        and not attrs["use_qdq"]
        and attrs.get("algo_config") is None
        and getattr(model, "quantization_algo", "default") == "default"
        and not (getattr(model, "int4_customized_weight_config", None) or {})
        and "MatMul" in attrs["op_types_to_quantize"]
        and name not in attrs["nodes_to_exclude"]
        and model.io_dtype == ir.DataType.FLOAT
        and "adapter_path" not in model.extra_options
        and getattr(model, "quant_type", None) is None
    )


def _ir():
    import onnx_ir

    return onnx_ir


def _patch_matmul(base) -> None:
    import numpy as np
    import torch
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    stock = base.Model.make_matmul_nbits

    def make_matmul_nbits(self, matmul, basename, root_input, **kwargs):
        if hasattr(matmul, "qweight") or not eager_int4(self, basename):
            return stock(self, matmul, basename, root_input, **kwargs)
        weight_name = basename[1:].replace("/", ".") + ".weight"
        block = int(self.quant_attrs["qdq_block_size"])
        symmetric = bool(self.quant_attrs["is_symmetric"])
        n, k = matmul.weight.shape  # a Linear's weight is [out, in]: the MatMul's B is its transpose [K, N]
        k_blocks = (k + block - 1) // block
        fp32 = np.zeros((k_blocks * block, n), dtype=np.float32)
        torch.from_numpy(fp32[:k]).copy_(matmul.weight.detach().T)  # cast in the copy: no second fp32 buffer
        release_pages(matmul.weight)
        packed = np.zeros((n, k_blocks, block // 2), dtype=np.uint8)
        zero_points = np.zeros((n, (k_blocks + 1) // 2), dtype=np.uint8)
        scales = np.zeros((n, k_blocks), dtype=np.float32)
        quantize_matmul_4bits(packed, fp32, scales, zero_points, block, n, k, symmetric)
        del fp32
        inputs = [root_input, f"{weight_name}_Q4", f"{weight_name}_scales"]
        self.make_initializer(packed, inputs[1])
        self.make_initializer(scales, inputs[2])
        if not symmetric:
            inputs.append(f"{weight_name}_zero_points")
            self.make_initializer(zero_points, inputs[3])
        attributes = {"K": k, "N": n, "bits": 4, "block_size": block}
        if self.quant_attrs["accuracy_level"]:
            attributes["accuracy_level"] = self.quant_attrs["accuracy_level"]
        output = "logits" if kwargs.get("logits", False) else f"{basename}/output_0"
        self.make_node("MatMulNBits", inputs=inputs, outputs=[output], name=f"{basename}_Q4", domain="com.microsoft",
                       **attributes)  # fmt: skip
        self.make_value(output, self.io_dtype, shape=["batch_size", kwargs.get("seq_dim", "sequence_length"), n])
        return basename

    base.Model.make_matmul_nbits = make_matmul_nbits


# ---------------------------------------------------------------- 4. pages released per layer


def _patch_layers(base) -> None:
    stock = base.Model.make_layer

    def make_layer(self, layer_id, layer):
        stock(self, layer_id, layer)
        if "adapter_path" in self.extra_options:  # peft scales LoRA weights in place: keep every page
            return
        for name, param in layer.named_parameters():
            if ".lora_" not in name:
                release_pages(param)

    base.Model.make_layer = make_layer


def _safetensors_ranges() -> list[tuple[int, int]]:
    ranges = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return ranges


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def release_pages(tensor) -> None:
    """Drop the resident pages of a tensor that is a view into a safetensors file's memory map
    (whole pages inside the tensor only). Private file pages that were never written are re-read
    from the file if touched again, so nothing changes but the resident memory."""
    try:
        start = tensor.data_ptr()
        span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    except (RuntimeError, AttributeError):
        return
    nbytes = span * tensor.element_size() if tensor.numel() else 0  # a transposed view spans the same bytes
    if nbytes < RELEASE_MIN_BYTES:
        return
    end = start + nbytes
    if not any(lo <= start and end <= hi for lo, hi in _safetensors_ranges()):
        return
    page = mmap.PAGESIZE
    first, last = (start + page - 1) // page * page, end // page * page
    if last > first:
        libc = _libc()
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(MADV_DONTNEED))


# ---------------------------------------------------------------- 5. no whole-model pass left to do


def _patch_to_nbits(base) -> None:
    stock = base.Model.to_nbits

    def to_nbits(self):
        if _nothing_to_quantize(self):
            return self.model
        return stock(self)

    base.Model.to_nbits = to_nbits


def _nothing_to_quantize(model) -> bool:
    """No MatMul or Gather with a constant float weight of a type the pass would quantise is left."""
    ir = _ir()
    op_types = set(model.quant_attrs["op_types_to_quantize"])
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    for node in model.model.graph.all_nodes():
        if node.op_type not in op_types or node.op_type not in ("MatMul", "Gather"):
            continue
        weight = node.inputs[1] if node.op_type == "MatMul" else node.inputs[0]
        if weight is not None and weight.const_value is not None and weight.const_value.dtype in floats:
            return False
    return True
