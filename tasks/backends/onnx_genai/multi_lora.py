"""Multi-LoRA for ONNX Runtime GenAI: one base graph, one `.onnx_adapter` file per adapter.

1. `build_lora_graph`: the og model builder's graph of the base model, with a LoRA branch added
   after every projection that the adapters' union of target modules reaches (`tasks.backends.onnx_genai.lora_graph`:
   the weights are graph inputs with a symbolic rank). The graph depends only on the base model,
   the module set, the precision and the builder options, so adding an adapter never rebuilds it.
2. `export_onnx_adapter`: each adapter's tensors, named exactly as the graph's inputs (names are
   read from the graph, never guessed from HF names — Olive issue #2277), in the branches' layout
   with alpha/r (or alpha/sqrt(r)) folded into B, written with `onnxruntime.AdapterFormat`.
   Branches an adapter does not train get zero tensors.
3. `assemble_bundle`: graph files (hard-linked, not copied) + adapters + a manifest.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import FtdError
from ftd.orchestration import stage_task
from ftd.progress import Progress
from ftd.store import Artifact, Store, code_version, library_versions, link_or_copy, stage_key
from tasks.backends.onnx_genai import lora_graph
from tasks.backends.onnx_genai.builder import BuilderProgress, builder_command, builder_in_process, extra_options
from tasks.backends.onnx_genai.runtime import og_greedy, og_tokens
from tasks.backends.runtime import Generation
from tasks.base_model import model_dir
from tasks.logged_command import BuildLog
from tasks.merge import read_adapter
from tasks.sft import adapter_dir

GRAPH, EXPORT, BUNDLE = "lora-graph", "onnx-adapter", "lora-bundle"
LIBRARIES = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers")
CODE = (__file__, lora_graph.__file__)


def union_targets(adapters: list[Artifact], store: Store) -> list[str]:
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
        code=code_version(*CODE),
        config={
            "modules": modules,
            "precision": target.precision,
            "device": target.device,
            "extra_options": target.options.get("extra_options") or {},
        },  # fmt: skip
        inputs=[base.key],
        libraries=library_versions(*LIBRARIES),
    )


def build_lora_graph(base: Artifact, modules: list[str], target: TargetConfig, store: Store) -> Artifact:
    def build(tmp: Path) -> dict:
        # the builder's own graph of the base model, with the target's builder options (as a merged engine)
        command = builder_command(model_dir(base), tmp, target, extra_options(target))
        progress = BuilderProgress(f"build multi-LoRA graph {target.name}", model_dir(base))
        BuildLog(tmp / "build.log").run(command, "multi-LoRA graph build", on_line=progress,
                                        in_process=builder_in_process(target))  # fmt: skip
        shutil.rmtree(tmp / ".builder-cache", ignore_errors=True)
        base_config = json.loads((model_dir(base) / "config.json").read_text())
        inputs = lora_graph.add_lora_branches(tmp / "model.onnx", base_config, modules)
        return {"modules": modules, "lora_inputs": inputs, "precision": target.precision}

    key = graph_key(base, modules, target)
    return store.materialize(GRAPH, key, build, lineage={"base": base.key})


# ---------------------------------------------------------------- 2. one .onnx_adapter per adapter


def export_key(graph: Artifact, adapter: Artifact) -> str:
    return stage_key(
        EXPORT,
        code=code_version(*CODE),
        config={},
        inputs=[graph.key, adapter.key],
        libraries=library_versions("onnxruntime", "safetensors"),
    )


def export_onnx_adapter(graph: Artifact, adapter: Artifact, store: Store) -> Artifact:
    name = adapter.meta["adapter_name"]

    def build(tmp: Path) -> dict:
        config, pairs = read_adapter(adapter_dir(adapter, store))
        arrays = lora_graph.adapter_arrays(graph.meta["lora_inputs"], config, pairs, name)
        write_onnx_adapter(arrays, tmp / f"{name}.onnx_adapter", Progress(f"export {name}.onnx_adapter", len(arrays)))
        return {"adapter_name": name, "file": f"{name}.onnx_adapter", "tensors": len(arrays),
                "ranks": sorted({p.A.shape[0] for p in pairs.values()})}  # fmt: skip

    return store.materialize(
        EXPORT, export_key(graph, adapter), build, lineage={"graph": graph.key, "adapter": adapter.key}
    )


def write_onnx_adapter(arrays: dict, path: Path, progress: Progress | None = None) -> None:
    """`arrays` (graph input name -> array) as an `.onnx_adapter` file (`onnxruntime.AdapterFormat`)."""
    import numpy as np
    import onnxruntime as ort

    params = {}
    for done, (input_name, array) in enumerate(arrays.items(), 1):
        if progress is not None:
            progress.update(done, input_name)
        params[input_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters(params)
    adapter_format.export_adapter(str(path))


# ---------------------------------------------------------------- 3. the bundle


def bundle_key(graph: Artifact, exports: list[Artifact]) -> str:
    return stage_key(
        BUNDLE, code=code_version(*CODE), config={}, inputs=[graph.key, *[e.key for e in exports]], libraries={}
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

    @classmethod
    @functools.lru_cache(maxsize=2)
    def shared(cls, bundle_dir: Path) -> MultiLoraEngine:
        """One loaded bundle per folder (the last two kept): every adapter's view shares its weights."""
        return cls(bundle_dir)

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
        return og_greedy(self.og, self.model, prompt_ids, max_new_tokens, eos_ids, self.adapters, adapter)

    def with_adapter(self, adapter: str | None) -> ActiveAdapter:
        """An `Engine` (the smoke test's interface) that decodes with `adapter` active."""
        if adapter not in self.names:
            raise FtdError(f"multi-LoRA bundle has no adapter {adapter!r} (it has {', '.join(self.names)})")
        return ActiveAdapter(self, adapter)


@dataclass
class ActiveAdapter:
    bundle: MultiLoraEngine
    adapter: str

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        return self.bundle.greedy(prompt_ids, max_new_tokens, eos_ids, self.adapter)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Iterator[int]:
        b = self.bundle
        for token, _ in og_tokens(b.og, b.model, prompt_ids, max_new_tokens, eos_ids, b.adapters, self.adapter):
            yield token


# ---------------------------------------------------------------- the stages, as cached tasks

graph_task = stage_task(build_lora_graph, GRAPH, graph_key, "lora-graph[{target.name}]")
export_task = stage_task(export_onnx_adapter, EXPORT, export_key, "onnx-adapter[{adapter.meta[adapter_name]}]")
bundle_task = stage_task(assemble_bundle, BUNDLE, bundle_key, "lora-bundle")
