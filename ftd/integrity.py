"""Cheap structural checks of weight files before anything reads them.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the data. A truncated download or a corrupted file shows up as a
header that does not fit the file, ranges that run past its end, or a range whose size is not
shape × dtype — all visible from the header alone, without reading the weights. (A flipped bit
inside the data cannot be seen this way; content hashes catch that where ftd keys on content.)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ftd.errors import FtdError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Validate `path`'s header against its size; return tensor name → (dtype, shape)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise FtdError(f"{path}: truncated safetensors file ({size} bytes, not even a header)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, MAX_HEADER):
            raise FtdError(
                f"{path}: corrupted or truncated safetensors file (header says {header_len} bytes, the file has {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FtdError(f"{path}: corrupted safetensors header (not valid JSON)") from None
    data_len = size - 8 - header_len
    tensors, end_max = {}, 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], list(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FtdError(f"{path}: corrupted safetensors header (entry {name!r} is malformed)") from None
        if dtype not in DTYPE_BYTES:
            raise FtdError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or begin < 0:
            raise FtdError(f"{path}: tensor {name!r} byte range {begin}..{end} does not match {dtype} {shape}")
        if end > data_len:
            raise FtdError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of the data, "
                f"which has only {data_len}); download or copy it again"
            )
        end_max = max(end_max, end)
        tensors[name] = (dtype, shape)
    if end_max != data_len:
        raise FtdError(f"{path}: corrupted safetensors file ({data_len - end_max} unexplained bytes after the data)")
    return tensors


def check_weight_dir(directory: Path) -> int:
    """Check every `*.safetensors` file of a model or adapter directory; return how many."""
    files = sorted(Path(directory).glob("*.safetensors"))
    for file in files:
        check_safetensors(file)
    return len(files)
