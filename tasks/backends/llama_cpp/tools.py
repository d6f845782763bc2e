"""Where llama.cpp lives on this machine: the runtime (the `llama_cpp` module of llama-cpp-python)
and, from the same sdist, the converters that `scripts/install_llama_cpp.sh` (run by
`make install`) unpacks under `<venv>/share/ftd-llama.cpp/llama.cpp`. `$FTD_LLAMA_CPP_TOOLS`
points elsewhere (a llama.cpp checkout of the same version)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is commit 0c1e570
SHARE = Path(sys.prefix) / "share" / "ftd-llama.cpp"
CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


def tools_dir() -> Path:
    return Path(os.environ.get("FTD_LLAMA_CPP_TOOLS") or SHARE / "llama.cpp")


def runtime_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable_reason() -> str | None:
    """None when both the runtime and the converters of one llama.cpp version are here."""
    recorded = SHARE / "UNAVAILABLE"
    if recorded.is_file():
        return f"llama.cpp could not be installed by make install: {recorded.read_text().strip()}"
    installed = runtime_version()
    if installed is None:
        return (f"the llama-cpp-python package is not installed (make install builds llama-cpp-python=={VERSION}; "
                "it needs cmake and a C++ compiler)")  # fmt: skip
    if installed != VERSION:
        return f"llama-cpp-python {installed} is installed; ftd's converters and checks are for {VERSION}"
    missing = [name for name in CONVERTERS if not (tools_dir() / name).exists()]
    if missing:
        return (f"llama.cpp's converters ({', '.join(missing)}) are not in {tools_dir()}: run make install "
                "(or set FTD_LLAMA_CPP_TOOLS to a llama.cpp checkout of the runtime's version)")  # fmt: skip
    return None
