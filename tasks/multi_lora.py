"""Multi-LoRA for ONNX Runtime GenAI: one base graph, one `.onnx_adapter` file per adapter.

1. `build_lora_graph`: the og model builder bakes a LoRA adapter into the graph as initializers
   (`model.layers.{i}.attn.q_proj.lora_A.MatMul.weight`, A as [in, r], B as [r, out] with the
   scale folded in). We build it from a *zero* adapter over the union of all adapters' target
   modules, then turn every LoRA initializer into a graph input with a symbolic rank, so the graph
   depends only on the base model and the module set: adding an adapter never rebuilds it.
2. `export_onnx_adapter`: each adapter's tensors, named exactly as the graph's inputs (names are
   read from the graph, never guessed from HF names — Olive issue #2277), transposed to the
   builder's layout with alpha/r (or alpha/sqrt(r)) folded into B, written with
   `onnxruntime.AdapterFormat`. Modules an adapter does not target get zero tensors.
3. `assemble_bundle`: graph files (hard-linked, not copied) + adapters + a manifest.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from ftd.config import TargetConfig
from ftd.errors import FtdError
from ftd.progress import Progress
from ftd.store import Artifact, Store, code_version, library_versions, link_or_copy, stage_key
from tasks.backends import Generation
from tasks.base_model import model_dir

GRAPH, EXPORT, BUNDLE = "lora-graph", "onnx-adapter", "lora-bundle"
LORA_INPUT = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<module>\w+)\.lora_(?P<ab>[AB])\.MatMul\.weight$"
)
# The builder unfuses these projections and gives each part its own LoRA: A is shared, B's rows
# are split in this order (Phi-3: qkv_proj = [q; k; v], gate_up_proj = [gate; up]).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
QUANTIZED = ("int4", "int8")  # builder precisions whose MatMuls become MatMulNBits
LIBRARIES = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "peft")


def union_targets(adapters: list[Artifact], store: Store) -> list[str]:
    from tasks.sft import adapter_dir

    modules: set[str] = set()
    for adapter in adapters:
        config = json.loads((adapter_dir(adapter, store) / "adapter_config.json").read_text())
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            raise FtdError(
                f"adapter {adapter.meta.get('adapter_name')}: regex target_modules cannot be used for multi-LoRA"
            )
        modules.update(targets)
    return sorted(modules)


# ---------------------------------------------------------------- 1. the base graph


def graph_key(base: Artifact, modules: list[str], target: TargetConfig) -> str:
    return stage_key(
        GRAPH,
        code=code_version(__file__),
        config={"modules": modules, "precision": target.precision, "device": target.device},
        inputs=[base.key],
        libraries=library_versions(*LIBRARIES),
    )


def build_lora_graph(base: Artifact, modules: list[str], target: TargetConfig, store: Store) -> Artifact:
    def build(tmp: Path) -> dict:
        from tasks.backends.onnx_genai import BuilderProgress, builder_in_process
        from tasks.logged_command import BuildLog

        zero = tmp / ".zero-adapter"
        _write_zero_adapter(model_dir(base), modules, zero)
        extra = [f"adapter_path={zero}"]
        if target.precision in QUANTIZED:  # quantise the base weights only: LoRA weights stay graph inputs
            extra.append("nodes_to_exclude=" + ",".join(lora_node_names(model_dir(base), modules)))
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir(base)), "-o", str(tmp),
            "-p", target.precision, "-e", target.device, "-c", str(tmp / ".builder-cache"),
            "--extra_options", *extra,
        ]  # fmt: skip
        progress = BuilderProgress(f"build multi-LoRA graph {target.name}", model_dir(base))
        BuildLog(tmp / "build.log").run(command, "multi-LoRA graph build", on_line=progress,
                                        in_process=builder_in_process(target))  # fmt: skip
        shutil.rmtree(zero)
        shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
        inputs = lora_initializers_to_inputs(tmp / "model.onnx")
        if not inputs:
            raise FtdError("the og builder produced no LoRA nodes for modules " + ", ".join(modules))
        return {"modules": modules, "lora_inputs": inputs, "precision": target.precision}

    key = graph_key(base, modules, target)
    return store.materialize(GRAPH, key, build, lineage={"base": base.key})


def lora_node_names(base_dir: Path, modules: list[str]) -> list[str]:
    """The builder's LoRA MatMul nodes (`/model/layers.{i}/attn/q_proj/lora_A/MatMul`) for `modules`.

    At int4 the builder quantises every float MatMul, LoRA ones included, which would bake the
    zero adapter into MatMulNBits weights; these names are excluded from quantisation instead.
    Both blocks are listed for every module (a name that matches no node is ignored), so no
    module-to-block table is needed; fused modules also list the parts the builder unfuses into."""
    layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    names = set(modules) | {part for m in modules for part in FUSED.get(m, ())}
    return [
        f"/model/layers.{i}/{block}/{module}/lora_{ab}/MatMul"
        for i in range(layers) for block in ("attn", "mlp") for module in sorted(names) for ab in "AB"
    ]  # fmt: skip


def _write_zero_adapter(base_dir: Path, modules: list[str], out: Path) -> None:
    """A PEFT adapter over `modules` whose update is zero: it only shapes the graph."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(skeleton, LoraConfig(r=1, lora_alpha=1, target_modules=modules, task_type="CAUSAL_LM"))
    tensors = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            key = name.replace(".default", "")
            tensors[key] = torch.zeros(param.shape, dtype=torch.float32)
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    peft_model.peft_config["default"].save_pretrained(out)


def lora_initializers_to_inputs(model_path: Path) -> dict[str, dict]:
    """Move every `.lora_` initializer into the graph inputs, rank dimension symbolic."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    found: dict[str, dict] = {}
    keep = []
    for init in graph.initializer:
        match = LORA_INPUT.match(init.name)
        if not match:
            keep.append(init)
            continue
        dims = list(init.dims)
        rank_axis = 1 if match["ab"] == "A" else 0
        shape: list = list(dims)
        shape[rank_axis] = f"lora_rank_{len(found)}"
        graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, shape))
        found[init.name] = {
            "layer": int(match["layer"]), "module": match["module"], "ab": match["ab"],
            "features": dims[1 - rank_axis], "dtype": TensorProto.DataType.Name(init.data_type).lower(),
        }  # fmt: skip
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(model_path))
    return found


# ---------------------------------------------------------------- 2. one .onnx_adapter per adapter


def export_key(graph: Artifact, adapter: Artifact) -> str:
    return stage_key(
        EXPORT,
        code=code_version(__file__),
        config={},
        inputs=[graph.key, adapter.key],
        libraries=library_versions("onnxruntime", "safetensors"),
    )


def export_onnx_adapter(graph: Artifact, adapter: Artifact, store: Store) -> Artifact:
    from tasks.merge import module_scale, read_adapter
    from tasks.sft import adapter_dir

    name = adapter.meta["adapter_name"]

    def build(tmp: Path) -> dict:
        import onnxruntime as ort

        config, pairs = read_adapter(adapter_dir(adapter, store))
        by_layer_module = {}
        for pair in pairs.values():
            match = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", pair.module)
            if not match:
                raise FtdError(f"adapter {name}: module {pair.module} is not a per-layer projection")
            by_layer_module[(int(match[1]), match[2])] = pair
        specs = graph.meta["lora_inputs"]
        params, used = {}, set()
        progress = Progress(f"export {name}.onnx_adapter", len(specs))
        for done, (input_name, spec) in enumerate(specs.items(), 1):
            progress.update(done, input_name)
            pair, rows = by_layer_module.get((spec["layer"], spec["module"])), None
            if pair is not None:
                used.add((spec["layer"], spec["module"]))
            else:
                pair, rows = _fused_part(by_layer_module, specs, spec, used)
            if pair is None:  # this adapter does not target the module: a zero update
                shape = (spec["features"], 1) if spec["ab"] == "A" else (1, spec["features"])
                array = np.zeros(shape, dtype=np.float32)
            else:
                rank = pair.A.shape[0]
                if spec["ab"] == "A":
                    array = pair.A.float().numpy().T  # peft [r, in] -> builder [in, r]
                else:
                    B = pair.B.float() if rows is None else pair.B.float()[rows[0] : rows[1]]
                    array = (B * module_scale(config, pair.module, rank)).numpy().T  # [out, r] -> [r, out]
            params[input_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        unused = sorted(set(by_layer_module) - used)
        if unused:
            raise FtdError(f"adapter {name}: modules {unused[:4]} are not in the multi-LoRA graph")
        adapter_format = ort.AdapterFormat()
        adapter_format.set_adapter_version(1)
        adapter_format.set_model_version(1)
        adapter_format.set_parameters(params)
        adapter_format.export_adapter(str(tmp / f"{name}.onnx_adapter"))
        return {"adapter_name": name, "file": f"{name}.onnx_adapter", "tensors": len(params),
                "ranks": sorted({p.A.shape[0] for p in pairs.values()})}  # fmt: skip

    return store.materialize(
        EXPORT, export_key(graph, adapter), build, lineage={"graph": graph.key, "adapter": adapter.key}
    )


def _fused_part(by_layer_module: dict, specs: dict, spec: dict, used: set):
    """For a graph part (q_proj) of a fused adapter module (qkv_proj): the pair and B's row range."""
    for fused, parts in FUSED.items():
        pair = by_layer_module.get((spec["layer"], fused))
        if pair is None or spec["module"] not in parts:
            continue
        sizes = {s["module"]: s["features"] for s in specs.values() if s["layer"] == spec["layer"] and s["ab"] == "B"}
        if any(p not in sizes for p in parts) or sum(sizes[p] for p in parts) != pair.B.shape[0]:
            raise FtdError(f"{pair.module}: cannot split its LoRA B {tuple(pair.B.shape)} into the graph's {parts}")
        start = sum(sizes[p] for p in parts[: parts.index(spec["module"])])
        used.add((spec["layer"], fused))
        return pair, (start, start + sizes[spec["module"]])
    return None, None


# ---------------------------------------------------------------- 3. the bundle


def bundle_key(graph: Artifact, exports: list[Artifact]) -> str:
    return stage_key(
        BUNDLE, code=code_version(__file__), config={}, inputs=[graph.key, *[e.key for e in exports]], libraries={}
    )


def assemble_bundle(graph: Artifact, exports: list[Artifact], store: Store) -> Artifact:
    def build(tmp: Path) -> dict:
        for item in graph.path(store).iterdir():
            if item.is_file() and item.name != "ftd-manifest.json":
                link_or_copy(item, tmp / item.name)
        (tmp / "adapters").mkdir()
        manifest = {"base_graph": graph.key, "adapters": {}}
        for export in exports:
            name = export.meta["adapter_name"]
            link_or_copy(export.path(store) / export.meta["file"], tmp / "adapters" / export.meta["file"])
            manifest["adapters"][name] = {"file": f"adapters/{export.meta['file']}", "key": export.key,
                                          "ranks": export.meta["ranks"]}  # fmt: skip
        (tmp / "adapters.json").write_text(json.dumps(manifest, indent=2))
        return {"adapters": sorted(manifest["adapters"]), "graph": graph.key}

    return store.materialize(BUNDLE, bundle_key(graph, exports), build, lineage={"graph": graph.key})


class MultiLoraEngine:
    """The bundle loaded once; each generator activates one adapter."""

    def __init__(self, bundle_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(bundle_dir))
        self.adapters = og.Adapters(self.model)
        manifest = json.loads((bundle_dir / "adapters.json").read_text())
        for name, entry in manifest["adapters"].items():
            self.adapters.load(str(bundle_dir / entry["file"]), name)
        self.names = sorted(manifest["adapters"])

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], adapter: str) -> Generation:
        from tasks.backends.og_runtime import og_greedy

        return og_greedy(self.og, self.model, prompt_ids, max_new_tokens, eos_ids, self.adapters, adapter)
