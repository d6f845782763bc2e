"""llama.cpp's converters and quantiser, run in a child interpreter (never imported by ftd).

Why a separate process: the converters put llama.cpp's own `gguf-py` first on `sys.path` (the
registry's `gguf` differs and breaks them) and import a package named `conversion`; a crash in
the quantiser's C code must fail one stage, not the flow. Usage:

    python worker.py TOOLS_DIR convert-hf  SPEC.json
    python worker.py TOOLS_DIR convert-lora SPEC.json
    python worker.py TOOLS_DIR quantize    SPEC.json

Each SPEC names its inputs, its output file and a `result` JSON file that receives what the
command measured (tensor types, the pre-tokenizer used, seconds).
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from collections import Counter
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's high-water mark (VmHWM; ru_maxrss would include the parent's RSS at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def tensor_census(path: Path) -> dict:
    """Tensor types and counts, plus the metadata ftd checks, read back from the written file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    # what a decode step reads: every tensor but the token embedding (one row per token is gathered)
    read_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    fields = {}
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "general.file_type"):  # fmt: skip
        field = reader.get_field(key)
        if field is not None:
            value = field.contents()
            fields[key] = value
    return {"tensor_types": dict(sorted(types.items())), "tensors": len(reader.tensors), "metadata": fields,
            "read_bytes_per_token": read_bytes}  # fmt: skip


def convert_hf(tools: Path, spec: dict) -> dict:
    """convert_hf_to_gguf.py, with one change made from outside its files: a BPE pre-tokenizer it
    does not recognise falls back to `spec["pre_tokenizer"]` (ftd then checks the tokenisation)."""
    from conversion import base

    recognised = base.TextModel.get_vocab_base_pre
    used = {"fallback": False}

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            used["fallback"] = True
            return spec["pre_tokenizer"]

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", spec["model_dir"], "--outfile", spec["out"], "--outtype", spec["outtype"]]
    runpy.run_path(str(tools / "convert_hf_to_gguf.py"), run_name="__main__")
    return {"pre_tokenizer_fallback": spec["pre_tokenizer"] if used["fallback"] else None}


def convert_lora(tools: Path, spec: dict) -> dict:
    sys.argv = ["convert_lora_to_gguf.py", "--base", spec["base_dir"], "--outfile", spec["out"],
                "--outtype", spec["outtype"], spec["adapter_dir"]]  # fmt: skip
    runpy.run_path(str(tools / "convert_lora_to_gguf.py"), run_name="__main__")  # its work is under __main__
    return {}


def quantize(tools: Path, spec: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec["ftype"]
    params.nthread = spec.get("threads", 0)
    code = llama_cpp.llama_model_quantize(spec["source"].encode(), spec["out"].encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code} for {spec['source']}")
    return {}


COMMANDS = {"convert-hf": convert_hf, "convert-lora": convert_lora, "quantize": quantize}


def main() -> None:
    tools, command, spec_path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    sys.path.insert(0, str(tools / "gguf-py"))
    sys.path.insert(0, str(tools))
    spec = json.loads(spec_path.read_text())
    started = time.perf_counter()
    result = COMMANDS[command](tools, spec)
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["peak_rss_mb"] = peak_rss_mb()
    result.update(tensor_census(Path(spec["out"])))
    Path(spec["result"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
