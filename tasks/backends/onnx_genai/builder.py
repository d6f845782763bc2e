"""ONNX Runtime GenAI engines: built with the og model builder or optimum's exporter.

Two exporters, chosen per target by `options.exporter`:

- `builder` (default): the onnxruntime-genai model builder writes the graph, `genai_config.json`
  and the tokenizer files in one go.
- `optimum`: optimum's ONNX exporter (task `text-generation-with-past`) writes the graph; the
  builder, run with `--extra_options config_only=true`, writes only `genai_config.json` and the
  tokenizer files; the config's decoder inputs/outputs are then rewritten from the exported
  graph's actual input/output names (optimum's graph has plain attention, not GroupQueryAttention,
  so `past_present_share_buffer` must be false). fp32 on CPU only.

Every tool is run through its documented entry point (`python -m ...`), whose exact command is
recorded in the engine's metadata (paths as placeholders) so a user can rerun it by hand. The og
builder runs that entry point inside the flow's process for CPU targets (tasks/logged_command.py:
same module, same arguments, no second start of torch); optimum's exporter and CUDA builds run as
subprocesses, which keep their large transient memory out of the flow's process.
Both engines run through the same `OgEngine` and face the same parity gate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import FtdError
from ftd.progress import Progress
from tasks.backends.onnx_genai import streaming
from tasks.logged_command import BuildLog

# (precision, device) pairs the builder accepts; the CPU ones can be built on this machine.
SUPPORTED = {
    ("fp32", "cpu"),
    ("int4", "cpu"),
    ("int8", "cpu"),
    ("fp32", "cuda"),
    ("fp16", "cuda"),
    ("bf16", "cuda"),
    ("int4", "cuda"),
}
# (precision, device) pairs the optimum path builds and has been parity-checked on.
OPTIMUM_SUPPORTED = {("fp32", "cpu")}
ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
}  # fmt: skip
EXPORTERS = ("builder", "optimum")
OPTION_KEYS = ("extra_options", "exporter")
OPTIMUM_TASK = "text-generation-with-past"


def exporter_of(target: TargetConfig) -> str:
    return target.options.get("exporter", "builder")


# ---------------------------------------------------------------- building


def build(merged_dir: Path, target: TargetConfig, out: Path) -> dict:
    """The engine of a merged model, by the target's exporter."""
    if exporter_of(target) == "optimum":
        return _build_optimum(merged_dir, target, out)
    log = BuildLog(out / "build.log")
    command = builder_command(merged_dir, out, target, extra_options(target))
    progress = BuilderProgress(f"build {target.name}", merged_dir)
    seconds = log.run(command, f"onnx_genai build of target {target.name}", on_line=progress,
                      in_process=builder_in_process(target))  # fmt: skip
    _remove_tree(out / ".builder-cache")
    shown = _shown(command, merged_dir, out)
    return {"exporter": "builder", "build_seconds": round(seconds, 3), "engine_bytes": _size(out),
            "command": shown, "commands": [shown]}  # fmt: skip


def _build_optimum(merged_dir: Path, target: TargetConfig, out: Path) -> dict:
    """optimum export → builder config_only → genai_config decoder I/O taken from the graph."""
    log = BuildLog(out / "build.log")
    export_dir, config_dir = out / ".optimum-export", out / ".genai-config"
    export = [
        sys.executable, "-m", "optimum.exporters.onnx", "--model", str(merged_dir), "--task", OPTIMUM_TASK,
        "--library-name", "transformers", str(export_dir),
    ]  # fmt: skip

    progress = Progress(f"build {target.name} (optimum)", 2)  # optimum prints nothing to count
    progress.update(0, "exporting the graph")
    export_seconds = log.run(export, f"optimum export of target {target.name}")
    progress.update(1, "graph exported; writing genai_config")
    graph = _single_onnx(export_dir, target)
    extra = ["config_only=true", *extra_options(target)]
    config = builder_command(merged_dir, config_dir, target, extra)
    config_seconds = log.run(config, f"genai_config (builder config_only) of target {target.name}",
                             in_process=builder_in_process(target))  # fmt: skip
    progress.update(2, "done")
    # The engine directory: optimum's graph (+ its external data) and the builder's config and
    # tokenizer files, side by side, laid out like a builder engine.
    for name in [graph.name, *_external_data_files(graph)]:
        shutil.move(str(export_dir / name), str(out / name))
    for path in config_dir.iterdir():
        if path.is_file():
            shutil.move(str(path), str(out / path.name))
    _remove_tree(export_dir)
    _remove_tree(config_dir)
    patch = patch_genai_config(out / "genai_config.json", out / graph.name)
    commands = [_shown(export, merged_dir, out), _shown(config, merged_dir, out)]
    return {
        "exporter": "optimum",
        "build_seconds": round(export_seconds + config_seconds, 3),
        "export_seconds": round(export_seconds, 3),
        "config_seconds": round(config_seconds, 3),
        "engine_bytes": _size(out),
        "command": " && ".join(commands),
        "commands": commands,
        "genai_config_patch": patch,
    }


# ---------------------------------------------------------------- genai_config from the graph

_FIXED_INPUTS = ("input_ids", "attention_mask", "position_ids")


def graph_io(graph_path: Path) -> dict:
    """Input/output names of an ONNX graph and whether it uses GroupQueryAttention (no weights read)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    shapes = {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    return {
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "shapes": shapes,
        "gqa": any(n.op_type == "GroupQueryAttention" for n in model.graph.node),
    }


def _layer_patterns(names: list[str], field: str) -> tuple[dict[str, str], list[str]]:
    """Group per-layer names (`past_key_values.3.key`) into og patterns (`past_key_values.%d.key`)."""
    patterns: dict[str, str] = {}
    rest = []
    for name in names:
        pattern = re.sub(r"\d+", "%d", name, count=1)
        if pattern == name:
            rest.append(name)
            continue
        kind = "key" if re.search(r"key[s]?$", name) else "value" if re.search(r"value[s]?$", name) else None
        if kind is None:
            raise FtdError(f"{field}: per-layer tensor {name!r} is neither a key nor a value cache")
        if patterns.setdefault(kind, pattern) != pattern:
            raise FtdError(f"{field}: {kind} caches named two ways: {patterns[kind]!r} and {pattern!r}")
    return patterns, rest


def decoder_io(io: dict, num_layers: int, where: str) -> dict:
    """og's `decoder.inputs`/`decoder.outputs` for a graph, checked against its layer count."""
    past, other_in = _layer_patterns(io["inputs"], f"{where} inputs")
    present, other_out = _layer_patterns(io["outputs"], f"{where} outputs")
    unknown = [n for n in other_in if n not in _FIXED_INPUTS] + [n for n in other_out if n != "logits"]
    if unknown:
        raise FtdError(f"{where}: onnxruntime-genai cannot feed/read {unknown} (graph inputs {io['inputs']})")
    has_cache = set(past) == set(present) == {"key", "value"}
    if "input_ids" not in other_in or "logits" not in other_out or not has_cache:
        raise FtdError(f"{where}: not a decoder with past key/values (inputs {io['inputs']}, outputs {io['outputs']})")
    for names, patterns in ((io["inputs"], past), (io["outputs"], present)):
        for pattern in patterns.values():
            expected = {pattern % i for i in range(num_layers)}
            found = {n for n in names if re.sub(r"\d+", "%d", n, count=1) == pattern}
            if found != expected:
                raise FtdError(f"{where}: expected {num_layers} layers of {pattern!r}, graph has {sorted(found)}")
    inputs = {n: n for n in _FIXED_INPUTS if n in other_in}
    inputs |= {"past_key_names": past["key"], "past_value_names": past["value"]}
    outputs = {"logits": "logits", "present_key_names": present["key"], "present_value_names": present["value"]}
    return {"inputs": inputs, "outputs": outputs}


def patch_genai_config(config_path: Path, graph_path: Path) -> dict:
    """Point genai_config.json's decoder at this graph: file name, I/O names, cache sharing."""
    config = json.loads(config_path.read_text())
    decoder = config["model"]["decoder"]
    io = graph_io(graph_path)
    layers = int(decoder["num_hidden_layers"])
    where = f"exported graph {graph_path.name}"
    names = decoder_io(io, layers, where)
    # The config's cache geometry must match the graph's past inputs where those are static.
    shape = io["shapes"][names["inputs"]["past_key_names"] % 0]
    if len(shape) == 4:
        for axis, key in ((1, "num_key_value_heads"), (3, "head_size")):
            if isinstance(shape[axis], int) and shape[axis] != int(decoder[key]):
                raise FtdError(
                    f"{where}: past key dim {axis} is {shape[axis]} but genai_config {key} is {decoder[key]}"
                )
    decoder["filename"] = graph_path.name
    decoder["inputs"], decoder["outputs"] = names["inputs"], names["outputs"]
    # Sharing one past/present buffer needs GroupQueryAttention; a plain-attention graph's present
    # grows by concatenation and fails against a pre-allocated max-length buffer.
    config["search"]["past_present_share_buffer"] = bool(io["gqa"])
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    return {**names, "past_present_share_buffer": bool(io["gqa"])}


# ---------------------------------------------------------------- helpers


def extra_options(target: TargetConfig) -> list[str]:
    """The target's `options.extra_options` as the builder's `k=v` arguments."""
    return [f"{k}={v}" for k, v in (target.options.get("extra_options") or {}).items()]


def builder_in_process(target: TargetConfig) -> bool:
    """The og builder runs inside the flow's process for CPU targets (its imports are already
    loaded there: ~5 s saved per build), streamed (`streaming.install`: the stock engine's bytes at
    a fraction of the memory); CUDA builds keep a process of their own, so the GPU memory they
    take is returned when they end."""
    if target.device != "cpu":
        return False
    streaming.install()
    return True


def builder_command(model_dir: Path, out: Path, target: TargetConfig, extra: list[str]) -> list[str]:
    """The og builder's documented command line for `target` (also the multi-LoRA base graph's)."""
    return [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(model_dir), "-o", str(out), "-p", target.precision, "-e", target.device,
        "-c", str(out / ".builder-cache"),
    ] + (["--extra_options", *extra] if extra else [])  # fmt: skip


def _shown(command: list[str], merged_dir: Path, out: Path) -> str:
    """The command as a user can rerun it: interpreter and paths as placeholders."""
    shown = []
    for c in command:
        if c == sys.executable:
            c = "python"
        elif c == str(merged_dir):
            c = "<merged model dir>"
        elif c == str(out) or c.startswith(str(out) + os.sep):
            c = "<engine dir>" + c[len(str(out)) :]
        shown.append(c)
    return " ".join(shown)


class BuilderProgress:
    """Progress of the og model builder, read from its output: it reads the embedding, each layer,
    the final norm and the LM head (the first 60% here), then saves the tensors under a tqdm
    counter (the rest)."""

    SAVED = re.compile(r"\|\s*(\d+)/(\d+) \[")

    def __init__(self, what: str, model_dir: Path):

        layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0)
        self.progress = Progress(what, 100, counted=False)
        self.reads, self.read = layers + 3, 0

    def __call__(self, line: str) -> None:
        if line.startswith("Reading "):
            self.read += 1
            self.progress.update(int(60 * min(self.read / self.reads, 1.0)), line[len("Reading ") :])
        elif (saved := self.SAVED.search(line)) and int(saved[2]):
            done, total = int(saved[1]), int(saved[2])
            self.progress.update(60 + int(40 * done / total), f"saving tensor {done}/{total}")


def _single_onnx(directory: Path, target: TargetConfig) -> Path:
    graphs = sorted(directory.glob("*.onnx"))
    if len(graphs) != 1:
        names = [g.name for g in graphs]
        raise FtdError(f"optimum export of target {target.name}: expected one decoder graph, got {names}")
    return graphs[0]


def _external_data_files(graph_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files |= {e.value for e in tensor.external_data if e.key == "location"}
    return sorted(files)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
