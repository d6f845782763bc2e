"""Merge a LoRA adapter into its base model, one weight shard at a time.

peft's `merge_and_unload` needs the whole model in memory. Here each base shard is read,
the adapter's update `W += (B @ A) * scale` is applied to the weights it targets, and the shard is
written out under the same name before the next one is read: peak memory is about one shard plus
the adapter. The arithmetic follows peft's `get_delta_weight` exactly (delta computed in float32,
cast to the weight's dtype, then added), so an fp32 merge is bitwise equal to peft's.

Adapters that cannot be merged this way are refused with the reason (DoRA, `modules_to_save`,
embedding LoRA, LoRA biases), never silently dropped.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from ftd.config import MergeSettings
from ftd.errors import FtdError
from ftd.integrity import check_safetensors
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from tasks.base_model import model_dir
from tasks.sft import adapter_dir

STAGE = "merged"
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip


class LoraPair:
    def __init__(self, module: str):
        self.module = module
        self.A = None
        self.B = None


def read_adapter(adapter_path: Path) -> tuple[dict, dict[str, LoraPair]]:
    """Adapter config and its LoRA pairs keyed by the base weight name they update."""
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    refuse_unmergeable(config, adapter_path)
    tensors = load_adapter_tensors(adapter_path)
    pairs: dict[str, LoraPair] = {}
    for key, tensor in sorted(tensors.items(), key=lambda item: "lora_embedding_" not in item[0]):
        if "lora_embedding_" in key or "lora_magnitude_vector" in key or key.endswith(".bias"):
            what = "embedding LoRA" if "embedding" in key else "DoRA" if "magnitude" in key else "LoRA bias"
            raise FtdError(f"{adapter_path}: {what} ({key}) cannot be merged by ftd; retrain without it")
        match = LORA_KEY.match(key)
        if not match and key.endswith((".base_layer.weight", "embed_tokens.weight", "lm_head.weight")):
            raise FtdError(
                f"{adapter_path}: the adapter stores full weights ({key}), e.g. resized embeddings saved with "
                "save_embedding_layers; ftd cannot carry them to the engines: retrain without them"
            )
        if not match:
            raise FtdError(f"{adapter_path}: unexpected tensor {key!r}: not a LoRA A/B weight")
        weight = f"{match['module']}.weight"
        pair = pairs.setdefault(weight, LoraPair(match["module"]))
        setattr(pair, match["ab"], tensor)
    for pair in pairs.values():
        if pair.A is None or pair.B is None:
            raise FtdError(f"{adapter_path}: {pair.module} has lora_A or lora_B missing")
    return config, pairs


def refuse_unmergeable(config: dict, adapter_path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise FtdError(f"{adapter_path}: peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("use_dora"):
        raise FtdError(f"{adapter_path}: DoRA adapters are not supported (use_dora=true)")
    if config.get("modules_to_save"):
        raise FtdError(
            f"{adapter_path}: modules_to_save={config['modules_to_save']} (fully retrained modules) "
            "are not supported: their weights would be lost by most backends"
        )


def load_adapter_tensors(adapter_path: Path) -> dict:
    """safetensors, or a legacy `adapter_model.bin` loaded with `weights_only=True` (no code runs)."""
    import torch
    from safetensors.torch import load_file

    st = adapter_path / "adapter_model.safetensors"
    if st.is_file():
        check_safetensors(st)
        return load_file(st)
    legacy = adapter_path / "adapter_model.bin"
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FtdError(f"{legacy}: refused: not a plain tensor file ({type(exc).__name__})") from None
    raise FtdError(f"{adapter_path}: no adapter_model.safetensors or adapter_model.bin")


def module_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r (or / sqrt(r) with rsLoRA), honouring peft's per-module alpha_pattern."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = value
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def merge_key(base: Artifact, adapter: Artifact, settings: MergeSettings) -> str:
    return stage_key(
        STAGE,
        code=code_version(__file__),
        config=settings,
        inputs=[base.key, adapter.key],
        libraries=library_versions("torch", "safetensors"),
    )


def merge_adapter(base: Artifact, adapter: Artifact, settings: MergeSettings, store: Store) -> Artifact:

    def build(tmp: Path) -> dict:
        return stream_merge(model_dir(base), adapter_dir(adapter, store), tmp, settings)

    key = merge_key(base, adapter, settings)
    return store.materialize(STAGE, key, build, lineage={"base": base.key, "adapter": adapter.key})


def stream_merge(base_dir: Path, adapter_path: Path, out: Path, settings: MergeSettings) -> dict:
    import torch

    config, pairs = read_adapter(adapter_path)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    shards = _weight_shards(base_dir)
    out_dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    pending = dict(pairs)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    scratch = Scratch()  # one read buffer and one update buffer, reused for every tensor

    def merged(name: str, weight):
        pair = pending.pop(_match(name, pending), None) if pending else None
        if pair is not None:
            weight = _apply(weight, pair, module_scale(config, pair.module, pair.A.shape[0]), fan_in_fan_out, scratch)
        if out_dtype is not None and weight.is_floating_point():
            weight = weight.to(out_dtype)
        return weight

    def produce(reader: SafetensorsReader, name: str):
        """An untouched tensor whose dtype stays is copied file to file by the kernel."""
        if (not pending or _match(name, pending) is None) and (out_dtype is None or not reader.is_float(name)):
            return reader.span(name)
        return merged(name, reader.read(name, scratch))

    for shard in shards:
        out_name = shard.with_suffix(".safetensors").name.replace("pytorch_model", "model")
        if shard.suffix == ".safetensors":
            with SafetensorsReader(shard) as reader:
                specs = [(n, _out_dtype(d, out_dtype), shape) for n, d, shape in reader.specs()]
                meta = {"format": "pt", **reader.metadata}
                total_bytes += write_safetensors(out / out_name, specs, lambda n, r=reader: produce(r, n), meta)
        else:  # a legacy pickle shard is loaded whole (safely); it is written out tensor by tensor
            tensors = torch.load(shard, map_location="cpu", weights_only=True)
            specs = [(n, _out_dtype(dtype_names()[t.dtype], out_dtype), list(t.shape)) for n, t in tensors.items()]
            total_bytes += write_safetensors(
                out / out_name, specs, lambda n, t=tensors: merged(n, t[n]), {"format": "pt"}
            )
            del tensors
        weight_map.update({name: out_name for name, _, _ in specs})
    if pending:
        missing = ", ".join(sorted(p.module for p in pending.values())[:5])
        raise FtdError(f"{adapter_path}: adapter targets modules the base model does not have: {missing}")
    # An index whenever the output has several files, or the base came with one: a one-shard
    # checkpoint named model-00001-of-00001.safetensors loads only through its index.
    if len(set(weight_map.values())) > 1 or any((base_dir / n).is_file() for n in INDEX_FILES):
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in COPIED_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    tokenizer_source = adapter_path if (adapter_path / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy2(tokenizer_source / name, out / name)
    return {"shards": len(shards), "merged_modules": len(pairs), "bytes": total_bytes}


INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Scratch:
    """Buffers that grow to the largest tensor and are then reused: fresh multi-megabyte buffers
    per tensor cost a page fault per 4 KiB every time (most of the merge's time before). Reads
    alternate between two buffers, so one tensor can be read and merged while the previous one
    is still being written (`write_safetensors` waits for a write before the next-but-one read)."""

    def __init__(self):
        self.read_buffers = [bytearray(), bytearray()]
        self.turn = 0
        self.update = None

    def bytes(self, n: int) -> memoryview:
        self.turn ^= 1
        if len(self.read_buffers[self.turn]) < n:
            self.read_buffers[self.turn] = bytearray(n)
        return memoryview(self.read_buffers[self.turn])[:n]

    def floats(self, shape: tuple[int, int]):
        import torch

        n = shape[0] * shape[1]
        if self.update is None or self.update.numel() < n:
            self.update = torch.empty(n, dtype=torch.float32)
        return self.update[:n].view(shape)


@dataclass(frozen=True)
class FileSpan:
    """Bytes of a source file to copy unchanged into the output."""

    file: object
    offset: int
    nbytes: int


@functools.cache
def dtype_names() -> dict:
    import torch

    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # fmt: skip


def _out_dtype(stored: str, cast) -> str:
    """The safetensors dtype a tensor will be written with (`cast` applies to floating tensors)."""
    names = dtype_names()
    return names[cast] if cast is not None and stored in {"F32", "F16", "BF16", "F64"} else stored


class SafetensorsReader:
    """Reads one tensor at a time with plain file reads. (safe_open memory-maps the file, and
    every page it touches stays in the process's resident set until the file is closed, so
    reading a whole shard through it costs the shard's size in RSS.)"""

    def __init__(self, path: Path):
        import struct

        check_safetensors(path)  # a truncated or corrupted shard fails here, naming the file
        self.file = open(path, "rb")  # noqa: SIM115 (closed in __exit__)
        (length,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(length))
        self.metadata = self.header.pop("__metadata__", None) or {}
        self.data_start = 8 + length

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def specs(self) -> list[tuple[str, str, list[int]]]:
        entries = sorted(self.header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        return [(name, e["dtype"], e["shape"]) for name, e in entries]

    def span(self, name: str) -> FileSpan:
        start, end = self.header[name]["data_offsets"]
        return FileSpan(self.file, self.data_start + start, end - start)

    def is_float(self, name: str) -> bool:
        return self.header[name]["dtype"] in {"F32", "F16", "BF16", "F64"}

    def read(self, name: str, scratch: Scratch | None = None):
        """The tensor, in `scratch`'s reused buffer when given (valid until the next read)."""
        import torch

        entry = self.header[name]
        start, end = entry["data_offsets"]
        buffer = scratch.bytes(end - start) if scratch is not None else bytearray(end - start)
        self.file.seek(self.data_start + start)
        if self.file.readinto(buffer) != len(buffer):
            raise FtdError(f"{self.file.name}: truncated: {name} is cut short")
        dtype = {v: k for k, v in dtype_names().items()}[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def write_safetensors(path: Path, specs: list[tuple[str, str, list[int]]], produce, metadata: dict) -> int:
    """Write a safetensors file one tensor at a time: the header is computed from `specs`
    (name, dtype, shape) up front, then each tensor is produced, written and freed, so peak
    memory is one tensor, not one shard. Returns the number of data bytes."""
    import math
    import struct

    import torch

    names = dtype_names()
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    # One writer thread: tensor i is written while tensor i+1 is read and merged (file I/O and
    # torch release the GIL). Writes stay in file order; at most one is in flight.
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="ftd-merge-write") as writer:
        with suppress(OSError, AttributeError):  # reserve the blocks at once: faster writes where supported
            os.posix_fallocate(f.fileno(), 0, 8 + len(encoded) + offset)
        _write_all(f, struct.pack("<Q", len(encoded)))
        _write_all(f, encoded)
        in_flight = None
        for name, dtype, shape in specs:
            item = produce(name)
            if isinstance(item, FileSpan):
                if item.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise FtdError(f"{path.name}: {name}: source holds {item.nbytes} bytes, expected a different size")
                job = (_copy_span, item, f)
            else:
                tensor = item.contiguous()
                if names[tensor.dtype] != dtype or list(tensor.shape) != list(shape):
                    raise FtdError(
                        f"{path.name}: {name} came out {tensor.dtype} {list(tensor.shape)}, expected {dtype} {shape}"
                    )
                job = (_write_all, f, tensor.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
                del tensor, item
            if in_flight is not None:
                in_flight.result()  # the previous write is done: its buffer may be read into again
            in_flight = writer.submit(*job)
            del job
        if in_flight is not None:
            in_flight.result()
    return offset


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]


def _copy_span(span: FileSpan, out) -> None:
    """Copy inside the kernel (copy_file_range; a reflink on filesystems that share extents),
    falling back to reads and writes through a small buffer."""
    remaining, offset = span.nbytes, span.offset
    try:
        while remaining:
            copied = os.copy_file_range(span.file.fileno(), out.fileno(), remaining, offset)
            if copied == 0:
                raise FtdError(f"{span.file.name}: truncated while copying")
            remaining -= copied
            offset += copied
    except (OSError, AttributeError):  # not supported here: copy what is left by hand
        while remaining:  # pread: the merge reads the same file meanwhile
            chunk = os.pread(span.file.fileno(), min(remaining, 16 << 20), offset)
            if not chunk:
                raise FtdError(f"{span.file.name}: truncated while copying") from None
            _write_all(out, chunk)
            remaining -= len(chunk)
            offset += len(chunk)


def weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the checkpoint headers (safetensors) without reading the weights."""
    import torch
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _weight_shards(base_dir):
        if shard.suffix == ".safetensors":
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:
            state = torch.load(shard, map_location="meta", weights_only=True)
            shapes.update({name: tuple(t.shape) for name, t in state.items()})
    return shapes


def _weight_shards(base_dir: Path) -> list[Path]:
    safetensors = sorted(base_dir.glob("*.safetensors"))
    if safetensors:
        return safetensors
    bins = sorted(p for p in base_dir.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FtdError(f"{base_dir}: no *.safetensors or pytorch_model*.bin weight files")


def _match(weight_name: str, pending: dict[str, LoraPair]) -> str | None:
    """Adapter modules are named from the peft-wrapped model (`model.layers.0...`); base
    checkpoints may carry or lack the outer `model.` prefix, so compare by suffix."""
    if weight_name in pending:
        return weight_name
    for candidate in pending:
        if weight_name.endswith("." + candidate) or candidate.endswith("." + weight_name):
            return candidate
    return None


def _apply(weight, pair: LoraPair, scale: float, fan_in_fan_out: bool, scratch: Scratch | None = None):
    import torch

    A, B = pair.A.to(torch.float32), pair.B.to(torch.float32)
    shape = (B.shape[0], A.shape[1])
    delta = torch.mm(B, A, out=scratch.floats(shape)) if scratch is not None else B @ A
    if fan_in_fan_out:
        delta = delta.T
    delta.mul_(scale)  # peft: (B @ A) * scale, the same two roundings
    expected = tuple(weight.shape)
    if tuple(delta.shape) != expected:
        raise FtdError(
            f"adapter module {pair.module}: update shape {tuple(delta.shape)} does not fit the base weight "
            f"{expected}; was the adapter trained on another base model?"
        )
    # peft (CPU) rounds the delta to the adapter's dtype only when that is half precision, then does
    # `weight += delta`, which adds in the promoted dtype and rounds once to the weight's dtype. A bf16 base
    # usually has an fp32 adapter (peft's autocast_adapter_dtype), so the delta must not be rounded first.
    if pair.B.dtype in (torch.float16, torch.bfloat16):
        delta = delta.to(pair.B.dtype)
    if weight.dtype == delta.dtype and scratch is not None:
        return weight.add_(delta)  # the weight lives in the read buffer: no new allocation
    return (weight + delta).to(weight.dtype)
